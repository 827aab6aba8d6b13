//! Bearer-token authentication: a tonic interceptor that admits calls whose `authorization:
//! Bearer <token>` is one of the tokens in a file, and the client side that sends one.
//!
//! The server keeps only SHA-256 digests of the tokens and compares digests in constant time (no
//! early exit on the first differing byte, none on the first non-matching token). The file (one
//! token per line; blank lines and `#` comments ignored) is re-read when it changes, so removing a
//! line revokes that token without a restart. grpc.health.v1 and reflection are served beside the
//! intercepted services, never behind them: probes need no token.

use crate::watch::{read_text, OnFailure, Watched};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;
use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

/// Watches one text file, parsed by `parse`; failing to read it now is an error.
fn watch_text<T: 'static>(
    path: &Path,
    parse: fn(&str) -> T,
    on_failure: OnFailure<T>,
) -> std::io::Result<Watched<T>> {
    Watched::open(
        vec![path.to_path_buf()],
        move |paths| read_text(&paths[0]).map(|t| parse(&t)),
        on_failure,
    )
    .map_err(std::io::Error::other)
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn parse_tokens(text: &str) -> Vec<[u8; 32]> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(digest)
        .collect()
}

/// Equal digests, in time independent of where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The tokens a server accepts (`--auth-tokens-file`), as a tonic interceptor.
#[derive(Debug, Clone)]
pub struct TokenAuth {
    tokens: Arc<Watched<Vec<[u8; 32]>>>,
}

impl TokenAuth {
    /// Reads `path` (one token per line); fails when it cannot be read now.
    pub fn from_file(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            tokens: Arc::new(watch_text(path, parse_tokens, OnFailure::Use(Vec::new))?),
        })
    }

    /// Whether `token` is one of the accepted tokens right now.
    pub fn accepts(&self, token: &str) -> bool {
        let presented = digest(token);
        // Every digest is compared: how long this takes says nothing about which one matched.
        self.tokens
            .get()
            .iter()
            .fold(false, |found, known| same(known, &presented) | found)
    }

    /// Checks the call's bearer token: UNAUTHENTICATED unless it is accepted.
    pub fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let header = req
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("authorization: a bearer token is required"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| Status::unauthenticated("authorization: expected \"Bearer <token>\""))?;
        if self.accepts(token) {
            Ok(())
        } else {
            Err(Status::unauthenticated("authorization: invalid token"))
        }
    }
}

/// The server-side interceptor: `None` = no authentication configured.
#[derive(Debug, Clone, Default)]
pub struct Authenticate(pub Option<TokenAuth>);

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(auth) = &self.0 {
            auth.check(&req)?;
        }
        Ok(req)
    }
}

/// The token a client sends: given directly (`--token`) or read from a file that is re-read
/// when it changes (`--store-token-file`, a rotated Secret).
#[derive(Debug, Clone, Default)]
pub struct BearerToken(Option<TokenSource>);

#[derive(Debug, Clone)]
enum TokenSource {
    Fixed(Arc<str>),
    File(Arc<Watched<String>>),
}

fn first_token(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap_or_default()
        .to_string()
}

impl BearerToken {
    /// Sends nothing.
    pub fn none() -> Self {
        Self(None)
    }

    /// Sends `token` (nothing when empty).
    pub fn fixed(token: &str) -> Self {
        let token = token.trim();
        Self((!token.is_empty()).then(|| TokenSource::Fixed(token.into())))
    }

    /// Sends the first token line of `path`, re-read when the file changes.
    pub fn from_file(path: &Path) -> std::io::Result<Self> {
        Ok(Self(Some(TokenSource::File(Arc::new(watch_text(
            path,
            first_token,
            OnFailure::Use(String::new),
        )?)))))
    }

    /// Adds `authorization: Bearer <token>` to `req` (when there is a token).
    pub fn attach<T>(&self, req: &mut Request<T>) -> Result<(), Status> {
        let token: Arc<str> = match &self.0 {
            None => return Ok(()),
            Some(TokenSource::Fixed(t)) => t.clone(),
            Some(TokenSource::File(w)) => w.get().as_str().into(),
        };
        if token.is_empty() {
            return Ok(());
        }
        let value = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| Status::invalid_argument("token: not a valid header value"))?;
        req.metadata_mut().insert("authorization", value);
        Ok(())
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        self.attach(&mut req)?;
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn file(name: &str, text: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("autopipe-auth-{name}-{}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    fn with(token: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(t) = token {
            r.metadata_mut().insert("authorization", t.parse().unwrap());
        }
        r
    }

    #[test]
    fn accepts_listed_tokens_and_reloads_on_change() {
        let path = file("tokens", "# team a\nalpha\n\n  beta  \n");
        let auth = TokenAuth::from_file(&path).unwrap();
        assert!(auth.check(&with(Some("Bearer alpha"))).is_ok());
        assert!(auth.check(&with(Some("Bearer beta"))).is_ok());
        for (given, want) in [
            (None, "authorization: a bearer token is required"),
            (Some("alpha"), "authorization: expected \"Bearer <token>\""),
            (Some("Bearer gamma"), "authorization: invalid token"),
            (Some("Bearer # team a"), "authorization: invalid token"),
        ] {
            let e = auth.check(&with(given)).unwrap_err();
            assert_eq!(
                (e.code(), e.message()),
                (tonic::Code::Unauthenticated, want)
            );
        }
        // Revoke alpha: a rewrite with different contents is seen on the next call.
        std::fs::write(&path, "beta\ngamma-longer\n").unwrap();
        assert!(auth.check(&with(Some("Bearer alpha"))).is_err());
        assert!(auth.check(&with(Some("Bearer gamma-longer"))).is_ok());
        std::fs::remove_file(&path).unwrap();
        assert!(
            auth.check(&with(Some("Bearer beta"))).is_err(),
            "fails closed"
        );
    }

    #[test]
    fn clients_attach_the_token_of_their_file() {
        let path = file("client", "\n# comment\nsecret-1\n");
        let token = BearerToken::from_file(&path).unwrap();
        let mut r = Request::new(());
        token.attach(&mut r).unwrap();
        assert_eq!(
            r.metadata().get("authorization").unwrap(),
            "Bearer secret-1"
        );
        std::fs::write(&path, "secret-two\n").unwrap();
        token.attach(&mut r).unwrap();
        assert_eq!(
            r.metadata().get("authorization").unwrap(),
            "Bearer secret-two"
        );
        let mut r = Request::new(());
        BearerToken::fixed("").attach(&mut r).unwrap();
        assert!(r.metadata().get("authorization").is_none());
        std::fs::remove_file(&path).unwrap();
    }
}
