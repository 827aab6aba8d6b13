//! Addresses both services listen on and connect to: TCP (`host:port`, `http://host:port`), TCP
//! with TLS (`https://host:port`, or any TCP address once TLS is configured: [`crate::tls`]) or a
//! Unix socket (`unix:///path/to.sock`, the default between an orchestrator and its store in one
//! pod; always plaintext).

use crate::tls::{ClientTls, ServerTls};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::{Channel, Endpoint, Uri};
use tower::layer::util::{Identity, Stack};
use tower::util::MapRequestLayer;

/// Largest gRPC message either side accepts or sends (images and tensors travel in one message).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// A parsed listen or connect address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `host:port`: plaintext unless TLS is configured.
    Tcp(String),
    /// `https://host:port`: TLS, which must be configured.
    Tls(String),
    Unix(PathBuf),
}

impl std::str::FromStr for Address {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(path) = s.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(format!("{s:?}: empty unix socket path"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let (hostport, tls) = match s.strip_prefix("https://") {
            Some(rest) => (rest, true),
            None => (s.strip_prefix("http://").unwrap_or(s), false),
        };
        if hostport.is_empty() || !hostport.contains(':') {
            return Err(format!(
                "{s:?}: expected host:port, http://host:port, https://host:port or unix:///path"
            ));
        }
        let hostport = hostport.trim_end_matches('/').to_string();
        Ok(if tls {
            Self::Tls(hostport)
        } else {
            Self::Tcp(hostport)
        })
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(hp) => write!(f, "{hp}"),
            Self::Tls(hp) => write!(f, "https://{hp}"),
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

/// TLS connections whose handshake finished, in the order they finished.
type TlsConnections = tokio_stream::wrappers::ReceiverStream<
    std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
>;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A bound listener, as a stream of connections tonic can serve.
pub enum Incoming {
    Tcp(
        tokio_stream::wrappers::TcpListenerStream,
        std::net::SocketAddr,
    ),
    Tls(TlsConnections, std::net::SocketAddr),
    Unix(tokio_stream::wrappers::UnixListenerStream, PathBuf),
}

impl Incoming {
    /// Binds `address` (a stale Unix socket file is replaced). TCP listeners serve TLS when `tls`
    /// is given (an `https://` address requires it); Unix sockets ignore it.
    pub async fn bind(address: &Address, tls: Option<&ServerTls>) -> std::io::Result<Self> {
        match (address, tls) {
            (Address::Tcp(hp), None) => {
                let listener = tokio::net::TcpListener::bind(hp).await?;
                let local = listener.local_addr()?;
                Ok(Self::Tcp(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    local,
                ))
            }
            (Address::Tls(_), None) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{address}: an https:// address needs a certificate (--tls-cert, --tls-key)"
                ),
            )),
            (Address::Tcp(hp) | Address::Tls(hp), Some(tls)) => {
                let listener = tokio::net::TcpListener::bind(hp).await?;
                let local = listener.local_addr()?;
                Ok(Self::Tls(accept_tls(listener, tls.clone()), local))
            }
            (Address::Unix(path), _) => {
                if path.exists() {
                    std::fs::remove_file(path)?;
                }
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let listener = tokio::net::UnixListener::bind(path)?;
                // Owner and group only (the orchestrator beside the store shares the pod's group):
                // a Unix socket carries no TLS and no token, its file mode is its access control.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
                Ok(Self::Unix(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    path.clone(),
                ))
            }
        }
    }

    /// Where it actually listens (the real port when bound to port 0).
    pub fn local_address(&self) -> Address {
        match self {
            Self::Tcp(_, a) => Address::Tcp(a.to_string()),
            Self::Tls(_, a) => Address::Tls(a.to_string()),
            Self::Unix(_, p) => Address::Unix(p.clone()),
        }
    }
}

/// Accepts on `listener` and runs each handshake on a task of its own (a slow or hostile client
/// holds up no one else); connections that finish it are served, the others are logged and closed.
fn accept_tls(listener: tokio::net::TcpListener, tls: ServerTls) -> TlsConnections {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            // Small unary calls (Acquire, Invoke) must not wait for Nagle's algorithm.
            let _ = tcp.set_nodelay(true);
            let (tls, tx) = (tls.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Why a channel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}: an https:// address needs the CA to trust (--tls-ca)")]
    NoCa(Address),
}

/// A lazily connecting channel to `address` (connection errors surface on the first call): TLS
/// over TCP when `tls` is configured, plaintext otherwise; Unix sockets are always plaintext.
pub fn channel(address: &Address, tls: &ClientTls) -> Result<Channel, ChannelError> {
    match address {
        Address::Tcp(hp) | Address::Tls(hp) if tls.is_enabled() => {
            let (hp, tls) = (hp.clone(), tls.clone());
            let host = hp
                .rsplit_once(':')
                .map_or(hp.as_str(), |(h, _)| h)
                .to_string();
            Ok(
                Endpoint::from_shared(format!("http://{hp}"))?.connect_with_connector_lazy(
                    tower::service_fn(move |_: Uri| {
                        let (hp, host, tls) = (hp.clone(), host.clone(), tls.clone());
                        async move {
                            let tcp = tokio::net::TcpStream::connect(&hp).await?;
                            tcp.set_nodelay(true)?;
                            let stream = tls.connect(&host, tcp).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                        }
                    }),
                ),
            )
        }
        Address::Tls(_) => Err(ChannelError::NoCa(address.clone())),
        Address::Tcp(hp) => Ok(Endpoint::from_shared(format!("http://{hp}"))?.connect_lazy()),
        Address::Unix(path) => {
            let path = path.clone();
            Ok(
                Endpoint::from_static("http://localhost").connect_with_connector_lazy(
                    tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                        }
                    }),
                ),
            )
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term => {} }
}

/// When a call reached the server's service stack, stamped by [`server`]'s layer. tonic starts its
/// own `grpc-timeout` timer (which answers CANCELLED, "Timeout expired") right after the inner
/// service's `call` returns, and the stamp is taken inside that `call`: a deadline measured from
/// this instant always falls before tonic's, however late the request is first polled on a loaded
/// machine, so the service can answer DEADLINE_EXCEEDED itself, as gRPC specifies.
#[derive(Debug, Clone, Copy)]
struct Arrived(Instant);

fn stamp_arrival(mut req: http::Request<Body>) -> http::Request<Body> {
    req.extensions_mut().insert(Arrived(Instant::now()));
    req
}

type StampArrival = MapRequestLayer<fn(http::Request<Body>) -> http::Request<Body>>;

/// The router every autopipe server serves ([`server`]'s).
pub type Router = tonic::transport::server::Router<Stack<StampArrival, Identity>>;

/// A tonic server builder whose requests carry their arrival time ([`arrived`]).
pub fn server() -> tonic::transport::Server<Stack<StampArrival, Identity>> {
    tonic::transport::Server::builder().layer(MapRequestLayer::new(stamp_arrival as fn(_) -> _))
}

/// When `req` reached the server, if it came through a [`server`].
pub fn arrived<T>(req: &tonic::Request<T>) -> Option<Instant> {
    req.extensions().get::<Arrived>().map(|a| a.0)
}

/// Serves `router` on `incoming` until `stopped` resolves.
async fn serve_incoming(
    router: Router,
    incoming: Incoming,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    match incoming {
        Incoming::Tcp(s, _) => {
            // Small unary calls (Acquire, Invoke) must not wait for Nagle's algorithm.
            let s = tokio_stream::StreamExt::map(s, |conn| {
                if let Ok(c) = &conn {
                    let _ = c.set_nodelay(true);
                }
                conn
            });
            router.serve_with_incoming_shutdown(s, stopped).await
        }
        Incoming::Tls(s, _) => router.serve_with_incoming_shutdown(s, stopped).await,
        Incoming::Unix(s, _) => router.serve_with_incoming_shutdown(s, stopped).await,
    }
}

/// Serves `health` alone, in plaintext, on `listen` for as long as the process runs: kubelet's
/// gRPC probes cannot speak TLS, so a TLS listener's probes go here (`--health-listen`).
/// Returns the address listened on.
pub async fn serve_health<H: tonic_health::pb::health_server::Health>(
    listen: &Address,
    health: tonic_health::pb::health_server::HealthServer<H>,
) -> std::io::Result<Address> {
    let incoming = Incoming::bind(listen, None).await?;
    let local = incoming.local_address();
    tracing::info!(listen = %local, "health serving (plaintext)");
    let router = server().add_service(health);
    tokio::spawn(async move {
        if let Err(e) = serve_incoming(router, incoming, std::future::pending()).await {
            tracing::error!(error = %e, "health listener failed");
        }
    });
    Ok(local)
}

/// Serves `router` on `incoming` until `shutdown` resolves; then runs `on_drain` (mark health
/// NOT_SERVING, refuse new work), lets in-flight calls finish, and stops after `drain_timeout` at
/// the latest.
pub async fn serve_with_drain<F>(
    router: Router,
    incoming: Incoming,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_drain: F,
    drain_timeout: std::time::Duration,
) -> Result<(), tonic::transport::Error>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!(timeout_s = drain_timeout.as_secs_f64(), "draining");
        on_drain.await;
        let _ = draining_tx.send(());
        let _ = stop_tx.send(());
    });
    let stopped = async move {
        let _ = stop_rx.await;
    };
    let mut server = tokio::spawn(serve_incoming(router, incoming, stopped));
    let drain_deadline = async move {
        if draining_rx.await.is_ok() {
            tokio::time::sleep(drain_timeout).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = &mut server => match r {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "server task failed");
                Ok(())
            }
        },
        _ = drain_deadline => {
            tracing::warn!("drain timeout passed with calls in flight; stopping");
            server.abort();
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unix_sockets_are_created_for_owner_and_group_only() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("autopipe-mode-{}.sock", std::process::id()));
        let incoming = Incoming::bind(&Address::Unix(path.clone()), None)
            .await
            .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660, "{mode:o}");
        drop(incoming);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "127.0.0.1:50051".parse::<Address>().unwrap(),
            Address::Tcp("127.0.0.1:50051".into())
        );
        assert_eq!(
            "http://store:50052/".parse::<Address>().unwrap(),
            Address::Tcp("store:50052".into())
        );
        assert_eq!(
            "unix:///run/autopipe/store.sock"
                .parse::<Address>()
                .unwrap(),
            Address::Unix("/run/autopipe/store.sock".into())
        );
        assert_eq!(
            "https://store:50052".parse::<Address>().unwrap(),
            Address::Tls("store:50052".into())
        );
        for bad in ["", "unix://", "localhost", "http://", "https://"] {
            assert!(bad.parse::<Address>().is_err(), "{bad:?}");
        }
    }
}
