//! Where a server may read models from: `--model-root` folders, the hub cache, and the hub repo
//! ids `--allow-hub` lets through.
//!
//! A server's `model` (and ControlNet, prior, any second model) is a name relative to a root
//! (`sd15` → `ROOT/sd15`), an absolute path inside a root, or a hub repo id. Everything else, and
//! every path that leaves the roots on the way (`..`, a symlink or a dangling link whose target is
//! outside, a sibling folder that merely shares a root's prefix), is [`Error::PermissionDenied`]
//! with one message that does not depend on whether the target exists: the refusal must not
//! become a file-system probe. Paths are checked one step at a time, so a symlink in the middle
//! of a path is caught as surely as one at its end. The store checks again (it is the process that
//! opens the files), including every file of a component folder.
//!
//! A process that is its own operator (`autopipe generate --embedded`, library users, tests) uses
//! [`ModelRoots::unconfined`]: it may read whatever its user can read, as diffusers does.

use crate::{Error, ModelRef, Result};
use std::path::{Component, Path, PathBuf};

/// The model locations a process may read.
#[derive(Debug, Clone, Default)]
pub struct ModelRoots {
    /// `None` = unconfined.
    confined: Option<Confined>,
}

#[derive(Debug, Clone)]
struct Confined {
    /// `--model-root` folders: names resolve against these.
    roots: Vec<Root>,
    /// The hub cache: readable (the hub client writes snapshots there), but names never resolve
    /// against it. Canonicalised at each check because it may not exist yet at start.
    hub_cache: Option<PathBuf>,
    /// `--allow-hub` patterns; empty = every hub repo id.
    allow_hub: Vec<HubPattern>,
}

/// A root as the operator wrote it and as the file system resolves it.
#[derive(Debug, Clone)]
struct Root {
    given: PathBuf,
    canonical: PathBuf,
}

/// One `--allow-hub` value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HubPattern {
    /// `org/*`: every repo of an organisation (or user).
    Org(String),
    /// `org/name` (or a namespace-less `name`): one repo.
    Repo(String),
}

impl std::str::FromStr for HubPattern {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        match s.strip_suffix("/*") {
            Some(org) if crate::model_ref::is_repo_id(org) && !org.contains('/') => {
                Ok(Self::Org(org.to_string()))
            }
            None if crate::model_ref::is_repo_id(s) => Ok(Self::Repo(s.to_string())),
            _ => Err(format!("expected org/name or org/*, got {s:?}")),
        }
    }
}

impl HubPattern {
    fn allows(&self, repo_id: &str) -> bool {
        match self {
            Self::Org(org) => repo_id
                .split_once('/')
                .is_some_and(|(namespace, _)| namespace == org),
            Self::Repo(id) => id == repo_id,
        }
    }
}

/// What a refused path or repo id hears: the same bytes whatever was asked and whether or not
/// the target exists (the reference itself is not echoed, so nothing about it can differ).
fn outside() -> Error {
    Error::PermissionDenied(
        "not a folder under this server's model roots (--model-root) nor an allowed hub repo id (--allow-hub)"
            .to_string(),
    )
}

/// How a walk from a root ended.
enum Walk {
    /// A folder inside the roots (canonical).
    Folder(PathBuf),
    /// A step inside a root does not exist (or is not a folder).
    Missing,
    /// A step leaves the roots (or could not be resolved).
    Denied,
}

impl ModelRoots {
    /// No confinement: any folder the process can read, any hub repo id.
    pub fn unconfined() -> Self {
        Self::default()
    }

    /// Confined to `roots` (each must be an existing folder) and `hub_cache`, with hub repo ids
    /// limited to `allow_hub` (`org/name` or `org/*`; empty = all).
    pub fn confined(
        roots: &[PathBuf],
        hub_cache: Option<&Path>,
        allow_hub: &[String],
    ) -> std::result::Result<Self, String> {
        let roots = roots
            .iter()
            .map(|given| {
                let canonical = given
                    .canonicalize()
                    .map_err(|e| format!("--model-root {}: {e}", given.display()))?;
                if !canonical.is_dir() {
                    return Err(format!("--model-root {}: not a folder", given.display()));
                }
                let given = std::path::absolute(given)
                    .map_err(|e| format!("--model-root {}: {e}", given.display()))?;
                Ok(Root {
                    given: normalize(&given).unwrap_or(given),
                    canonical,
                })
            })
            .collect::<std::result::Result<_, String>>()?;
        let allow_hub = allow_hub
            .iter()
            .map(|p| p.parse().map_err(|e| format!("--allow-hub: {e}")))
            .collect::<std::result::Result<_, String>>()?;
        Ok(Self {
            confined: Some(Confined {
                roots,
                hub_cache: hub_cache.map(Path::to_path_buf),
                allow_hub,
            }),
        })
    }

    /// A server's confinement: `--model-root` folders, `--allow-hub` patterns and the hub cache
    /// of the environment (`HF_HUB_CACHE`, `HF_HOME`), where hub snapshots are read from.
    pub fn for_server(
        roots: &[PathBuf],
        allow_hub: &[String],
    ) -> std::result::Result<Self, String> {
        let hub = crate::HubOptions::from_env();
        Self::confined(roots, Some(&hub.cache_dir), allow_hub)
    }

    /// Whether anything is refused at all.
    pub fn is_confined(&self) -> bool {
        self.confined.is_some()
    }

    /// Classifies a request's model reference: a folder inside a root (canonical path) or an
    /// allowed hub repo id. Unconfined, this is [`ModelRef::parse`].
    pub fn resolve(&self, model: &str, revision: &str) -> Result<ModelRef> {
        let Some(c) = &self.confined else {
            return ModelRef::parse(model, revision);
        };
        let model = model.trim();
        if model.is_empty() {
            return Err(Error::InvalidReference(model.to_string()));
        }
        let path = Path::new(model);
        if path.is_absolute() {
            return c.folder(path, model).map(ModelRef::Local);
        }
        let relative = normalize(path).ok_or_else(outside)?;
        // As diffusers: an existing folder wins over a hub id; here only folders under a root.
        for root in &c.roots {
            match c.walk(root.canonical.clone(), &relative) {
                Walk::Folder(folder) => return Ok(ModelRef::Local(folder)),
                Walk::Denied => return Err(outside()),
                Walk::Missing => {}
            }
        }
        match ModelRef::parse_hub(model, revision) {
            Ok(ModelRef::Hub { repo_id, .. })
                if !c.allow_hub.is_empty() && !c.allow_hub.iter().any(|p| p.allows(&repo_id)) =>
            {
                Err(outside())
            }
            Ok(hub) => Ok(hub),
            // A path that is no folder under a root (nothing outside the roots was looked at).
            Err(_) if crate::model_ref::looks_like_path(model) => Err(Error::NotFound(format!(
                "no model folder {model} under this server's model roots"
            ))),
            Err(e) => Err(e),
        }
    }

    /// The store's check of a component folder it was asked to load: `dir` must be an absolute
    /// path inside a root or the hub cache, and so must every file in it (what the store reads:
    /// config, weights, shard indexes). Returns the folder's canonical path.
    pub fn component_folder(&self, dir: &Path) -> Result<PathBuf> {
        let Some(c) = &self.confined else {
            return Ok(dir.to_path_buf());
        };
        let given = dir.display().to_string();
        if !dir.is_absolute() {
            return Err(outside());
        }
        let folder = c.folder(dir, &given)?;
        let entries =
            std::fs::read_dir(&folder).map_err(|e| Error::NotFound(format!("{given}: {e}")))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::NotFound(format!("{given}: {e}")))?;
            match entry.path().canonicalize() {
                Ok(target) if c.inside(&target).is_some() => {}
                // A dangling link or one that leaves the roots: refused like the folder itself.
                _ => return Err(outside()),
            }
        }
        Ok(folder)
    }
}

impl Confined {
    /// The canonical root (or hub cache) that holds canonical path `p`, if any. `Path::starts_with`
    /// compares whole components, so `/models-evil` is not inside `/models`.
    fn inside(&self, p: &Path) -> Option<PathBuf> {
        self.roots
            .iter()
            .map(|r| r.canonical.clone())
            .chain(self.hub_cache.as_ref().and_then(|h| h.canonicalize().ok()))
            .find(|root| p.starts_with(root))
    }

    /// Where lexically normalised absolute path `p` starts: the canonical form of the root (as
    /// given or canonical) or hub cache it begins with, and the rest.
    fn split<'p>(&self, p: &'p Path) -> Option<(PathBuf, &'p Path)> {
        let hub = self
            .hub_cache
            .as_ref()
            .and_then(|h| Some((std::path::absolute(h).ok()?, h.canonicalize().ok()?)));
        let found = self
            .roots
            .iter()
            .flat_map(|r| [(&r.given, &r.canonical), (&r.canonical, &r.canonical)])
            .chain(hub.as_ref().map(|(given, canonical)| (given, canonical)))
            .find_map(|(prefix, canonical)| {
                Some((canonical.clone(), p.strip_prefix(prefix).ok()?))
            });
        found
    }

    /// Checks absolute `path` step by step from the root it starts in; every symlink on the way
    /// must resolve inside a root. Returns the canonical folder. A missing step inside a root is
    /// NOT_FOUND (it says nothing about anything outside the roots).
    fn folder(&self, path: &Path, given: &str) -> Result<PathBuf> {
        let path = normalize(path).ok_or_else(outside)?;
        let (root, rest) = self.split(&path).ok_or_else(outside)?;
        match self.walk(root, rest) {
            Walk::Folder(folder) => Ok(folder),
            Walk::Missing => Err(Error::NotFound(format!(
                "model folder {given} does not exist"
            ))),
            Walk::Denied => Err(outside()),
        }
    }

    /// Follows `rest` from canonical `root` one step at a time; a symlink must resolve inside a
    /// root before the next step is looked at, so nothing beyond an escaping link is ever probed.
    fn walk(&self, mut at: PathBuf, rest: &Path) -> Walk {
        for step in rest.components() {
            at.push(step);
            let Ok(meta) = at.symlink_metadata() else {
                return Walk::Missing;
            };
            if meta.file_type().is_symlink() {
                match at.canonicalize() {
                    Ok(target) if self.inside(&target).is_some() => at = target,
                    _ => return Walk::Denied,
                }
            }
        }
        if at.is_dir() {
            Walk::Folder(at)
        } else {
            Walk::Missing
        }
    }
}

/// `p` with `.` and `..` steps resolved lexically; `None` when a `..` climbs above its start (a
/// relative name out of its root, or above `/`). Lexical is safe here because what is opened is
/// the canonical folder the walk returns, never the string the client sent: `link/..` cannot
/// reach the link target's parent.
fn normalize(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    let mut depth = 0usize;
    for c in p.components() {
        match c {
            Component::ParentDir => {
                if depth == 0 {
                    return None;
                }
                out.pop();
                depth -= 1;
            }
            Component::CurDir => {}
            Component::Normal(_) => {
                out.push(c);
                depth += 1;
            }
            other => out.push(other),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `base/{models/{sd,link-out,link-in,dangling,nested/deep},models-evil/sd,outside/secret}`.
    fn tree(name: &str) -> PathBuf {
        let base =
            std::env::temp_dir().join(format!("autopipe-roots-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        for d in [
            "models/sd/unet",
            "models/nested/deep",
            "models-evil/sd",
            "outside/secret",
        ] {
            std::fs::create_dir_all(base.join(d)).unwrap();
        }
        std::fs::write(base.join("models/sd/unet/config.json"), "{}").unwrap();
        let link = std::os::unix::fs::symlink;
        link(base.join("outside/secret"), base.join("models/link-out")).unwrap();
        link(base.join("models/sd"), base.join("models/link-in")).unwrap();
        link(base.join("outside/nothing"), base.join("models/dangling")).unwrap();
        link(base.join("outside"), base.join("models/nested/out")).unwrap();
        base.canonicalize().unwrap()
    }

    fn denied(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(Error::PermissionDenied(m)) => m,
            other => panic!("expected PermissionDenied, got {other:?}"),
        }
    }

    #[test]
    fn names_resolve_under_roots_and_escapes_are_refused_alike() {
        let base = tree("resolve");
        let roots = ModelRoots::confined(&[base.join("models")], None, &[]).unwrap();
        let sd = base.join("models/sd");
        assert_eq!(
            roots.resolve("sd", "").unwrap(),
            ModelRef::Local(sd.clone())
        );
        assert_eq!(
            roots.resolve("./sd", "").unwrap(),
            ModelRef::Local(sd.clone())
        );
        assert_eq!(
            roots.resolve("link-in", "").unwrap(),
            ModelRef::Local(sd.clone())
        );
        let absolute = sd.display().to_string();
        assert_eq!(roots.resolve(&absolute, "").unwrap(), ModelRef::Local(sd));
        // Existing and missing targets outside the roots: the same refusal, word for word.
        for (existing, missing) in [
            (base.join("outside/secret"), base.join("outside/nothing")),
            (base.join("models-evil/sd"), base.join("models-evil/none")),
            (
                base.join("models/../outside/secret"),
                base.join("models/../outside/x"),
            ),
            (base.join("models/link-out"), base.join("models/dangling")),
            (
                base.join("models/nested/out/secret"),
                base.join("models/nested/out/x"),
            ),
        ] {
            let (e, m) = (
                existing.display().to_string(),
                missing.display().to_string(),
            );
            let (de, dm) = (denied(roots.resolve(&e, "")), denied(roots.resolve(&m, "")));
            assert_eq!(de, dm, "{e} vs {m}");
        }
        for (e, m) in [
            ("../outside/secret", "../outside/nothing"),
            ("link-out", "dangling"),
            ("nested/out/secret", "nested/out/nothing"),
        ] {
            let (de, dm) = (denied(roots.resolve(e, "")), denied(roots.resolve(m, "")));
            assert_eq!(de, dm, "{e} vs {m}");
        }
        // Missing inside a root: NOT_FOUND; a repo id: the hub.
        assert!(matches!(
            roots.resolve("nested/none/x", ""),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            roots.resolve("org/name", "").unwrap(),
            ModelRef::Hub { .. }
        ));
    }

    #[test]
    fn the_hub_allowlist_admits_orgs_and_repos() {
        let base = tree("hub");
        let allow = ["acme/*".to_string(), "other/one".to_string()];
        let roots = ModelRoots::confined(&[base.join("models")], None, &allow).unwrap();
        assert!(roots.resolve("acme/x", "").is_ok());
        assert!(roots.resolve("other/one", "").is_ok());
        denied(roots.resolve("other/two", ""));
        denied(roots.resolve("acmex/y", ""));
        denied(roots.resolve("name", ""));
        assert!(ModelRoots::confined(&[], None, &["a/b/c".into()]).is_err());
        assert!(ModelRoots::confined(&[base.join("none")], None, &[]).is_err());
    }

    #[test]
    fn the_store_checks_folders_and_every_file_in_them() {
        let base = tree("store");
        let roots = ModelRoots::confined(&[base.join("models")], None, &[]).unwrap();
        assert!(roots.component_folder(&base.join("models/sd/unet")).is_ok());
        let e = denied(roots.component_folder(&base.join("outside/secret")));
        let m = denied(roots.component_folder(&base.join("outside/nothing")));
        assert_eq!(e, m);
        denied(roots.component_folder(Path::new("models/sd/unet")));
        // A weight file linked out of the roots, or dangling, refuses the folder.
        let unet = base.join("models/sd/unet");
        std::os::unix::fs::symlink(base.join("outside/secret"), unet.join("w.safetensors"))
            .unwrap();
        denied(roots.component_folder(&unet));
        std::fs::remove_file(unet.join("w.safetensors")).unwrap();
        std::os::unix::fs::symlink(base.join("outside/no"), unet.join("w.safetensors")).unwrap();
        denied(roots.component_folder(&unet));
        // The hub cache is readable but names do not resolve against it.
        let hub = ModelRoots::confined(&[], Some(&base.join("outside")), &[]).unwrap();
        assert!(hub.component_folder(&base.join("outside/secret")).is_ok());
        assert!(matches!(
            hub.resolve("secret", ""),
            Ok(ModelRef::Hub { .. })
        ));
        assert!(ModelRoots::unconfined()
            .component_folder(&base.join("outside/secret"))
            .is_ok());
    }
}
