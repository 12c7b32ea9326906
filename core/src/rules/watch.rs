//! Hot reload: the rules path is watched (inotify through `notify`, with a slow poll as a safety
//! net), and a valid change is swapped in atomically: a request sees the old rules or the new,
//! never none. An invalid change is logged and counted, and the old rules stay. A file is read
//! only once its content has stopped changing across a short interval, and a change that would
//! leave a domain with no rules, when it had some, is refused unless the file says
//! `descriptors: []`: a half-written file must never lift every limit.

use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwapOption;
use notify::Watcher as _;
use tokio_util::sync::CancellationToken;

use super::{RuleSet, RulesError, load_path, parse::rule_files};

/// Told the outcome of every load (true: ok), for the reload counters.
pub type ReloadObserver = Arc<dyn Fn(bool) + Send + Sync>;

/// How long to let a burst of file events settle (an editor's save, a ConfigMap's symlink swap).
const SETTLE: Duration = Duration::from_millis(150);
/// How many times to wait for a changing file to settle before loading what is there anyway.
const MAX_SETTLES: usize = 20;
/// The safety net for missed events (network filesystems, exotic mounts).
const POLL_EVERY: Duration = Duration::from_secs(2);

/// The rules in force (none when RULES is unset), swappable while requests read them.
pub struct RulesHandle {
    current: ArcSwapOption<RuleSet>,
    path: Option<PathBuf>,
    observer: Option<ReloadObserver>,
}

impl RulesHandle {
    /// No rules: every Envoy descriptor is answered OK.
    pub fn none() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            path: None,
            observer: None,
        }
    }

    /// Rules that never change (no file behind them): for embedding, tests and fuzzing.
    pub fn fixed(set: RuleSet) -> Self {
        Self {
            current: ArcSwapOption::from_pointee(set),
            path: None,
            observer: None,
        }
    }

    /// Loads `path` (a file or a directory of `*.yaml`); an error stops the start. `observer`
    /// hears of this load and of every reload.
    pub fn load(path: &Path, observer: Option<ReloadObserver>) -> Result<Self, RulesError> {
        let set = load_path(path)?;
        let handle = Self {
            current: ArcSwapOption::from_pointee(set),
            path: Some(path.to_path_buf()),
            observer,
        };
        handle.observe(true);
        Ok(handle)
    }

    fn observe(&self, ok: bool) {
        if let Some(o) = &self.observer {
            o(ok);
        }
    }

    /// The rules now; cheap (no lock, no copy).
    pub fn current(&self) -> Option<Arc<RuleSet>> {
        self.current.load_full()
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Loads the path again; on success the new rules replace the old, on error nothing changes.
    pub fn reload(&self) -> Result<(), RulesError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let loaded = load_path(path).and_then(|set| {
            let lost = self
                .current()
                .map(|old| old.domains_emptied_by(&set))
                .unwrap_or_default();
            if lost.is_empty() {
                Ok(set)
            } else {
                Err(RulesError(format!(
                    "{}: the change would leave domain {} with no rules; refused (a file that \
                     means it says `descriptors: []`)",
                    path.display(),
                    lost.iter()
                        .map(|d| format!("{d:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        });
        match loaded {
            Ok(set) => {
                let count = set.rules().len();
                self.current.store(Some(Arc::new(set)));
                self.observe(true);
                tracing::info!(path = %path.display(), rules = count, "rules reloaded");
                Ok(())
            }
            Err(e) => {
                self.observe(false);
                tracing::error!(error = %e, "rules change rejected; the previous rules stay in force");
                Err(e)
            }
        }
    }
}

/// A digest of what the path holds now (None when it cannot be read).
fn fingerprint(path: &Path) -> Option<u64> {
    let files = rule_files(path).ok()?;
    let mut h = DefaultHasher::new();
    for f in files {
        f.hash(&mut h);
        std::fs::read(&f).ok()?.hash(&mut h);
    }
    Some(h.finish())
}

/// Watches the rules path until `stop`, reloading when its content changes.
pub fn spawn_watcher(
    rules: Arc<RulesHandle>,
    stop: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let path = rules.path()?.to_path_buf();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    // Watch the directory: a file is replaced by rename, and a ConfigMap swaps its `..data`
    // symlink; both show as events in the directory, not on the old file.
    let dir = if path.is_dir() {
        path.clone()
    } else {
        // A bare file name (`--rules rules.yaml`) has an empty parent: the working directory.
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    };
    let watcher = notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
        let _ = tx.send(());
    })
    .and_then(|mut w| {
        w.watch(&dir, notify::RecursiveMode::NonRecursive)
            .map(|()| w)
    });
    let watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, dir = %dir.display(), "cannot watch rules; polling every {POLL_EVERY:?}");
            None
        }
    };
    Some(tokio::spawn(async move {
        let _watcher = watcher; // dropping it stops the events
        // Reading and parsing files blocks: done on the blocking pool, never on a runtime thread.
        let look = |path: PathBuf| async move {
            tokio::task::spawn_blocking(move || fingerprint(&path))
                .await
                .ok()
                .flatten()
        };
        let mut last = look(path.clone()).await;
        let mut poll = tokio::time::interval(POLL_EVERY);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                Some(()) = rx.recv() => {
                    tokio::time::sleep(SETTLE).await;
                    while rx.try_recv().is_ok() {}
                }
                _ = poll.tick() => {}
            }
            // Reload only what has stopped changing: a file written in steps (a valid prefix,
            // then the rest) must not be loaded half-written.
            let mut now = look(path.clone()).await;
            if now != last {
                for _ in 0..MAX_SETTLES {
                    tokio::time::sleep(SETTLE).await;
                    let again = look(path.clone()).await;
                    if again == now {
                        break;
                    }
                    now = again;
                }
            }
            if now != last {
                // A failed reload is remembered too: the same broken content is reported once.
                let rules = rules.clone();
                let _ = tokio::task::spawn_blocking(move || rules.reload()).await;
                last = now;
            }
        }
    }))
}
