//! TLS on every TCP listener and connection of both daemons and the CLI (rustls with the `ring`
//! provider): a server certificate, optional client-certificate verification against a CA
//! (mTLS), and on the client side the CA to trust and an optional client identity.
//!
//! Every file is watched ([`crate::watch`]): each new connection (accepted or dialled) uses the
//! files as they are now, so a certificate rotated in place (cert-manager rewriting a Secret) is
//! served from the next handshake on, without a restart and without touching connections already
//! open. A file caught half-written keeps the last good configuration. Unix sockets never carry
//! TLS (their file mode is their access control).

use crate::watch::{OnFailure, Watched};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// HTTP/2 is all gRPC speaks; offering it by ALPN is what gRPC clients expect.
const H2: &[u8] = b"h2";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(Arc::new(roots))
}

/// `[cert, key]` or `[cert, key, client_ca]` → a server configuration.
fn server_config(paths: &[PathBuf]) -> Result<rustls::ServerConfig, String> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match paths.get(2) {
        Some(ca) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?,
        ),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certificates(&paths[0])?, private_key(&paths[1])?)
        .map_err(|e| format!("{} / {}: {e}", paths[0].display(), paths[1].display()))?;
    config.alpn_protocols = vec![H2.to_vec()];
    Ok(config)
}

/// `[ca]` or `[ca, cert, key]` → a client configuration.
fn client_config(paths: &[PathBuf]) -> Result<rustls::ClientConfig, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(&paths[0])?);
    let mut config = match (paths.get(1), paths.get(2)) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(certificates(cert)?, private_key(key)?)
            .map_err(|e| format!("{} / {}: {e}", cert.display(), key.display()))?,
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![H2.to_vec()];
    Ok(config)
}

/// A server's TLS: its certificate chain and key, and (mTLS) the CA client certificates must
/// chain to. Cheap to clone; every clone sees the files' current version.
#[derive(Debug, Clone)]
pub struct ServerTls {
    config: Arc<Watched<rustls::ServerConfig>>,
    verifies_clients: bool,
}

impl ServerTls {
    /// Loads the PEM files now (a daemon refuses to start when they are missing or invalid).
    pub fn from_files(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self, String> {
        let mut paths = vec![cert.to_path_buf(), key.to_path_buf()];
        paths.extend(client_ca.map(Path::to_path_buf));
        Ok(Self {
            config: Arc::new(Watched::open(paths, server_config, OnFailure::KeepLast)?),
            verifies_clients: client_ca.is_some(),
        })
    }

    /// Whether clients must present a certificate signed by the client CA.
    pub fn verifies_clients(&self) -> bool {
        self.verifies_clients
    }

    /// The handshake for one accepted connection, with the files as they are now.
    pub async fn accept<IO>(&self, io: IO) -> std::io::Result<tokio_rustls::server::TlsStream<IO>>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        tokio_rustls::TlsAcceptor::from(self.config.get())
            .accept(io)
            .await
    }
}

/// Flags of a server's TLS (orchestrator, store, `autopipe serve`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerTlsArgs {
    /// PEM certificate chain served on TCP listeners (TLS); re-read when the file changes.
    /// Unset: plaintext. Unix sockets stay plaintext either way.
    #[arg(long = "tls-cert", env = "AUTOPIPE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert; re-read when the file changes.
    #[arg(long = "tls-key", env = "AUTOPIPE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// mTLS: PEM CA bundle client certificates must chain to; a client without one cannot
    /// connect. Re-read when the file changes.
    #[arg(
        long = "tls-client-ca",
        env = "AUTOPIPE_TLS_CLIENT_CA",
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<PathBuf>,
    /// Also serve grpc.health.v1 alone, in plaintext, on this host:port: kubelet's gRPC probes
    /// cannot speak TLS. (The metrics listener stays plaintext too: bind it to loopback or a
    /// pod-only address.)
    #[arg(long = "health-listen", env = "AUTOPIPE_HEALTH_LISTEN")]
    pub health_listen: Option<crate::transport::Address>,
}

impl ServerTlsArgs {
    /// The configured TLS, loaded now; `None` when no certificate is given.
    pub fn load(&self) -> Result<Option<ServerTls>, String> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                ServerTls::from_files(cert, key, self.tls_client_ca.as_deref())
                    .map(Some)
                    .map_err(|e| format!("--tls-cert/--tls-key/--tls-client-ca: {e}"))
            }
            _ => Ok(None),
        }
    }
}

/// A client's TLS: the CA to trust and, for mTLS, the certificate and key to present. The
/// default (no CA) dials TCP in plaintext. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ClientTls(Option<Arc<Watched<rustls::ClientConfig>>>);

impl ClientTls {
    /// Plaintext.
    pub fn none() -> Self {
        Self(None)
    }

    /// Trusts servers whose certificate chains to `ca`; presents `identity` (certificate chain,
    /// key) when given. Loads the PEM files now.
    pub fn from_files(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Self, String> {
        let mut paths = vec![ca.to_path_buf()];
        if let Some((cert, key)) = identity {
            paths.extend([cert.to_path_buf(), key.to_path_buf()]);
        }
        Ok(Self(Some(Arc::new(Watched::open(
            paths,
            client_config,
            OnFailure::KeepLast,
        )?))))
    }

    /// From the flag values: a CA enables TLS; a certificate needs its key and a CA.
    pub fn from_flags(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Self, String> {
        match (ca, cert, key) {
            (None, None, None) => Ok(Self::none()),
            (Some(ca), None, None) => Self::from_files(ca, None),
            (Some(ca), Some(cert), Some(key)) => Self::from_files(ca, Some((cert, key))),
            (None, _, _) => Err("a client certificate needs the CA to trust as well".into()),
            _ => Err("a client certificate and its key go together".into()),
        }
    }

    /// Whether connections over TCP use TLS.
    pub fn is_enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Opens TLS over `io` to `host` (the name or IP the server certificate must carry), with
    /// the files as they are now.
    pub async fn connect<IO>(
        &self,
        host: &str,
        io: IO,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<IO>>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let Some(config) = &self.0 else {
            return Err(std::io::Error::other("TLS is not configured (no CA)"));
        };
        let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']'))
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?
            .to_owned();
        tokio_rustls::TlsConnector::from(config.get())
            .connect(name, io)
            .await
    }
}

/// Flags of a client's TLS (the CLI's `--server`/`--store`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientTlsArgs {
    /// PEM CA bundle the server's certificate must chain to: connect over TLS (an https://
    /// address needs it).
    #[arg(long = "tls-ca", env = "AUTOPIPE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// mTLS: PEM client certificate chain to present (with --tls-client-key and --tls-ca).
    #[arg(
        long = "tls-client-cert",
        env = "AUTOPIPE_TLS_CLIENT_CERT",
        requires_all = ["tls_client_key", "tls_ca"]
    )]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of --tls-client-cert.
    #[arg(
        long = "tls-client-key",
        env = "AUTOPIPE_TLS_CLIENT_KEY",
        requires = "tls_client_cert"
    )]
    pub tls_client_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// The configured TLS (plaintext when no CA is given), loaded now.
    pub fn load(&self) -> Result<ClientTls, String> {
        ClientTls::from_flags(
            self.tls_ca.as_deref(),
            self.tls_client_cert.as_deref(),
            self.tls_client_key.as_deref(),
        )
        .map_err(|e| format!("--tls-ca/--tls-client-cert/--tls-client-key: {e}"))
    }
}
