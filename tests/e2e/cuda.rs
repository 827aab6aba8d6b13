//! CUDA linkage and start-up: the binaries that compute keep libtorch_cuda in their `DT_NEEDED`
//! when their libtorch has it (crates/torch-link), and `--device cuda` where no GPU can be used
//! stops the process at start-up with the reason, before anything is served.

use autopipe_e2e::{bin, fixtures, free_port};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binaries that run libtorch on a device.
const COMPUTING: [&str; 2] = ["autopipe-store", "autopipe"];

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// `NEEDED` entries of an ELF file's dynamic section.
fn needed(path: &PathBuf) -> Vec<String> {
    let out = run(Command::new("readelf").arg("-d").arg(path));
    assert!(out.status.success(), "readelf -d {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split('[').nth(1)?.trim_end_matches(']').to_string()))
        .collect()
}

/// The folder the binary's libtorch_cpu.so resolves to at run time (ldd, this environment).
fn libtorch_dir(path: &PathBuf) -> PathBuf {
    let out = run(Command::new("ldd").arg(path));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("libtorch_cpu.so"))
        .unwrap_or_else(|| panic!("{} does not link libtorch_cpu.so:\n{text}", path.display()));
    let lib = line
        .split("=>")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("libtorch_cpu.so not found for {}:\n{text}", path.display()));
    PathBuf::from(lib)
        .parent()
        .expect("libtorch_cpu.so has a folder")
        .to_path_buf()
}

#[test]
fn binaries_keep_libtorch_cuda_when_their_libtorch_has_it() {
    for name in COMPUTING {
        let path = bin(name);
        let has_cuda = libtorch_dir(&path).join("libtorch_cuda.so").is_file();
        let needed = needed(&path);
        assert!(
            needed.iter().any(|n| n == "libtorch_cpu.so"),
            "{name}: {needed:?}"
        );
        assert_eq!(
            needed.iter().any(|n| n == "libtorch_cuda.so"),
            has_cuda,
            "{name}: libtorch has libtorch_cuda.so: {has_cuda}; NEEDED: {needed:?}"
        );
        println!("{name}: libtorch_cuda available {has_cuda}, linked {has_cuda}");
    }
}

/// Whether this machine has a usable NVIDIA GPU (then the start-up refusal cannot be observed).
fn gpu_present() -> bool {
    std::path::Path::new("/dev/nvidia0").exists()
}

/// Runs a command that must exit by itself (it would otherwise serve), bounded generously.
fn exits(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("{cmd:?} still running after 120 s: it started instead of refusing the device");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn device_cuda_without_a_gpu_fails_at_start_up_with_the_reason() {
    if gpu_present() {
        println!("a GPU is present: the start-up refusal is not observable here");
        return;
    }
    let listen = || format!("127.0.0.1:{}", free_port());
    let model = fixtures().join("checkpoints/sd1-tiny");
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "autopipe-store",
            vec![
                "--listen".into(),
                listen(),
                "--device".into(),
                "cuda".into(),
            ],
        ),
        (
            "autopipe",
            vec![
                "serve".into(),
                "--listen".into(),
                listen(),
                "--device".into(),
                "cuda:0".into(),
            ],
        ),
        (
            "autopipe",
            vec![
                "generate".into(),
                "--embedded".into(),
                "--device".into(),
                "cuda".into(),
                "--model".into(),
                model.display().to_string(),
                "--prompt".into(),
                "x".into(),
                "--output".into(),
                std::env::temp_dir()
                    .join("autopipe-cuda-never-written.png")
                    .display()
                    .to_string(),
            ],
        ),
    ];
    for (name, args) in cases {
        let mut cmd = Command::new(bin(name));
        cmd.args(&args);
        let out = exits(cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name} {args:?}: {stderr}");
        // With libtorch_cuda linked (the test above) the reason is the missing device, not
        // a missing CUDA backend.
        let cuda_linked = libtorch_dir(&bin(name)).join("libtorch_cuda.so").is_file();
        let reason = if cuda_linked {
            "no such CUDA device (0 visible"
        } else {
            "has no CUDA support"
        };
        assert!(
            stderr.contains("--device: cuda") && stderr.contains(reason),
            "{name} {args:?}: expected {reason:?}: {stderr}"
        );
        println!("{name} {}: {}", args.join(" "), stderr.trim());
    }
}
