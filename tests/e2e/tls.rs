//! TLS and mTLS end to end, with certificates made in the test: the split deployment over mTLS
//! on both hops (client → orchestrator → store) and `autopipe serve` over TLS generate the same
//! images as diffusers; clients without a valid certificate cannot reach either daemon, nor can an
//! orchestrator without one reach the store; plaintext health listeners answer probes; a
//! certificate rotated on disk is served from the next connection on, without a restart and
//! without dropping the connections already open.

use autopipe_e2e::*;
use autopipe_proto::transport::{self, Address};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("autopipe-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

fn local(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// grpc.health.v1 Check("") over a fresh channel.
fn health(rt: &tokio::runtime::Runtime, address: &Address, tls: &ClientTls) -> Result<i32, String> {
    rt.block_on(async {
        let channel = transport::channel(address, tls).map_err(|e| e.to_string())?;
        health_on(channel).await
    })
}

async fn health_on(channel: tonic::transport::Channel) -> Result<i32, String> {
    let mut c = tonic_health::pb::health_client::HealthClient::new(channel);
    tokio::time::timeout(
        Duration::from_secs(30),
        c.check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .map_err(|_| "no answer in 30 s".to_string())?
    .map(|r| r.into_inner().status)
    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;

/// Generates `case` through the orchestrator at `address` and returns the PSNR against diffusers.
fn generate(
    rt: &tokio::runtime::Runtime,
    address: &Address,
    tls: &ClientTls,
    case: &str,
) -> Result<(f64, Vec<u8>), tonic::Status> {
    let resp = rt.block_on(async {
        orchestrator_client_over(address, tls)
            .generate(reference_request(case))
            .await
    })?;
    let img = &resp.into_inner().images[0];
    Ok((
        psnr(&decode(img), &reference_image(case, 0)),
        img.png.clone(),
    ))
}

/// Runs the CLI with `args`; true when it exits 0.
fn cli(args: &[String]) -> (bool, String) {
    let out = std::process::Command::new(bin("autopipe"))
        .args(args)
        .env_remove("AUTOPIPE_TOKEN")
        .output()
        .expect("run autopipe");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn split_over_mtls_generates_and_admits_only_certified_clients() {
    let dir = scratch("split");
    let ca = TestCa::new(&dir, "ca");
    let rogue = TestCa::new(&dir, "rogue");
    let (store_cert, store_key) = ca.issue("store");
    let (orch_cert, orch_key) = ca.issue("orchestrator");
    let (client_cert, client_key) = ca.issue("client");
    let (rogue_cert, rogue_key) = rogue.issue("intruder");
    let certified = ClientTls::from_files(&ca.cert, Some((&client_cert, &client_key))).unwrap();

    let store_addr = Address::Tls(local(free_port()));
    let store_health = Address::Tcp(local(free_port()));
    let store_args: Vec<String> = [
        "--listen",
        &store_addr.to_string(),
        "--threads",
        "1",
        "--tls-cert",
        &p(&store_cert),
        "--tls-key",
        &p(&store_key),
        "--tls-client-ca",
        &p(&ca.cert),
        "--health-listen",
        &store_health.to_string(),
    ]
    .map(String::from)
    .to_vec();
    let store = Service::start_with_tls(
        "autopipe-store",
        store_addr.clone(),
        &store_args,
        &[],
        certified.clone(),
    );
    let orchestrator_args = |address: &Address, health: &Address, with_cert: bool| {
        let mut args: Vec<String> = [
            "--listen",
            &address.to_string(),
            "--store",
            &store_addr.to_string(),
            "--store-tls-ca",
            &p(&ca.cert),
            "--tls-cert",
            &p(&orch_cert),
            "--tls-key",
            &p(&orch_key),
            "--tls-client-ca",
            &p(&ca.cert),
            "--health-listen",
            &health.to_string(),
        ]
        .map(String::from)
        .to_vec();
        if with_cert {
            args.extend(
                [
                    "--store-tls-client-cert",
                    &p(&orch_cert),
                    "--store-tls-client-key",
                    &p(&orch_key),
                ]
                .map(String::from),
            );
        }
        args
    };
    let orch_addr = Address::Tls(local(free_port()));
    let orch_health = Address::Tcp(local(free_port()));
    let orchestrator = Service::start_with_tls(
        "autopipe-orchestrator",
        orch_addr.clone(),
        &orchestrator_args(&orch_addr, &orch_health, true),
        &[],
        certified.clone(),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();

    // The normal path, both hops over mTLS: diffusers' image.
    let (psnr, _) = generate(&rt, &orchestrator.address, &certified, "sd1_t2i_euler").unwrap();
    println!("split over mTLS: sd1_t2i_euler vs diffusers PSNR {psnr:.2} dB");
    assert!(psnr >= 40.0, "PSNR {psnr:.2} dB");

    // Who cannot get in, on either daemon.
    let ca_only = ClientTls::from_files(&ca.cert, None).unwrap();
    let intruder = ClientTls::from_files(&ca.cert, Some((&rogue_cert, &rogue_key))).unwrap();
    let plaintext_to = |a: &Address| match a {
        Address::Tls(hp) => Address::Tcp(hp.clone()),
        other => other.clone(),
    };
    for (daemon, address) in [("orchestrator", &orch_addr), ("store", &store_addr)] {
        for (who, address, tls) in [
            ("no client certificate", address.clone(), &ca_only),
            ("a certificate from another CA", address.clone(), &intruder),
            ("plaintext", plaintext_to(address), &ClientTls::none()),
        ] {
            let got = health(&rt, &address, tls);
            println!("{daemon:<12} {who:<30} → {got:?}");
            assert!(got.is_err(), "{daemon}: {who} got in: {got:?}");
        }
        assert_eq!(health(&rt, address, &certified), Ok(SERVING), "{daemon}");
    }
    let refused = generate(&rt, &orch_addr, &ca_only, "sd1_t2i_euler");
    assert!(refused.is_err(), "Generate without a client certificate");

    // Probes: grpc.health.v1 in plaintext on the health listeners, and nothing else there.
    for (daemon, address) in [("orchestrator", &orch_health), ("store", &store_health)] {
        assert_eq!(
            health(&rt, address, &ClientTls::none()),
            Ok(SERVING),
            "{daemon} health listener"
        );
    }
    let on_health_port = generate(&rt, &orch_health, &ClientTls::none(), "sd1_t2i_euler");
    assert_eq!(
        on_health_port.map(|_| ()).unwrap_err().code(),
        tonic::Code::Unimplemented,
        "the health listener serves health only"
    );

    // The store admits only orchestrators holding a certificate from its client CA.
    let bare_addr = Address::Tls(local(free_port()));
    let bare_health = Address::Tcp(local(free_port()));
    let bare = Service::start_with_tls(
        "autopipe-orchestrator",
        bare_addr.clone(),
        &orchestrator_args(&bare_addr, &bare_health, false),
        &[],
        certified.clone(),
    );
    let e = generate(&rt, &bare.address, &certified, "sd1_t2i_euler").unwrap_err();
    println!(
        "orchestrator without a store client certificate → {:?}: {}",
        e.code(),
        e.message()
    );
    assert_eq!(e.code(), tonic::Code::Unavailable, "{}", e.message());

    // The CLI: --tls-ca / --tls-client-cert / --tls-client-key, on --server and --store.
    let with_cert = |flag: &str, address: &Address, cmd: &str, extra: &[&str]| {
        let mut args: Vec<String> = [cmd, flag, &address.to_string(), "--tls-ca", &p(&ca.cert)]
            .map(String::from)
            .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let model = reference_request("sd1_t2i_euler").model;
    let resolve = ["--model", model.as_str()];
    let cert_flags = [
        "--tls-client-cert",
        &p(&client_cert),
        "--tls-client-key",
        &p(&client_key),
    ];
    let mut args = with_cert("--server", &orch_addr, "resolve", &resolve);
    args.extend(cert_flags.iter().map(|s| s.to_string()));
    let (ok, err) = cli(&args);
    assert!(ok, "resolve with a client certificate: {err}");
    let (ok, _) = cli(&with_cert("--server", &orch_addr, "resolve", &resolve));
    assert!(!ok, "resolve without a client certificate got in");
    let mut args = with_cert("--store", &store_addr, "stats", &[]);
    args.extend(cert_flags.iter().map(|s| s.to_string()));
    let (ok, err) = cli(&args);
    assert!(ok, "stats with a client certificate: {err}");
    let (ok, err) = cli(&[
        "resolve".into(),
        "--server".into(),
        orch_addr.to_string(),
        "--model".into(),
        model.clone(),
    ]);
    assert!(!ok);
    assert!(err.contains("--tls-ca"), "{err}");
    drop((store, orchestrator, bare));
}

#[test]
fn serve_over_tls_serves_a_rotated_certificate_without_a_restart() {
    let dir = scratch("rotate");
    let (ca1, ca2) = (TestCa::new(&dir, "one"), TestCa::new(&dir, "two"));
    let (cert, key) = ca1.issue("server");
    let addr = Address::Tls(local(free_port()));
    let args: Vec<String> = [
        "serve",
        "--listen",
        &addr.to_string(),
        "--threads",
        "1",
        "--tls-cert",
        &p(&cert),
        "--tls-key",
        &p(&key),
    ]
    .map(String::from)
    .to_vec();
    let trusts_one = ClientTls::from_files(&ca1.cert, None).unwrap();
    let trusts_two = ClientTls::from_files(&ca2.cert, None).unwrap();
    let mut serve =
        Service::start_with_tls("autopipe", addr.clone(), &args, &[], trusts_one.clone());
    let rt = tokio::runtime::Runtime::new().unwrap();

    let (psnr, before) = generate(&rt, &addr, &trusts_one, "sd1_t2i_euler").unwrap();
    println!("autopipe serve over TLS: sd1_t2i_euler vs diffusers PSNR {psnr:.2} dB");
    assert!(psnr >= 40.0, "PSNR {psnr:.2} dB");
    assert!(
        health(&rt, &addr, &trusts_two).is_err(),
        "a client trusting another CA got in"
    );

    // A connection opened before the rotation.
    let open = {
        let _runtime = rt.enter();
        transport::channel(&addr, &trusts_one).unwrap()
    };
    assert_eq!(rt.block_on(health_on(open.clone())), Ok(SERVING));

    ca2.issue_to("server", &cert, &key);

    // New connections get the new certificate: trusted by CA two only.
    assert_eq!(
        health(&rt, &addr, &trusts_two),
        Ok(SERVING),
        "rotated certificate not served"
    );
    let old = health(&rt, &addr, &trusts_one);
    println!("after the rotation, a client trusting only the old CA → {old:?}");
    assert!(old.is_err(), "the old certificate is still served");
    let (_, after) = generate(&rt, &addr, &trusts_two, "sd1_t2i_euler").unwrap();
    assert!(
        before == after,
        "same request, same image across the rotation"
    );
    // A certificate caught half-written keeps the last good one in service.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nMIIB").unwrap();
    assert_eq!(
        health(&rt, &addr, &trusts_two),
        Ok(SERVING),
        "a half-written certificate replaced the good one"
    );
    // The connection opened before is still up (a reconnect would have failed: it trusts CA one).
    assert_eq!(
        rt.block_on(health_on(open)),
        Ok(SERVING),
        "open connection dropped"
    );
    assert!(
        serve.child.try_wait().unwrap().is_none(),
        "serve restarted or exited"
    );
    serve.kill();
}
