//! The agent's configuration file (default `/etc/daxvisor-agent.conf`; a missing file means the defaults):
//! `key=value` lines, `#` comments. `guest-tools/agent/daxvisor-agent.conf` is the commented example: `every=`
//! (periodic reclaim, off by default), `mount=`, `min-size=`, `timeout=`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::thin::{parse_every, parse_size};

/// Periodic reclaim settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReclaimConfig {
    /// `None`: no periodic reclaim.
    pub every: Option<Duration>,
    /// Empty: every filesystem on a pmem device.
    pub mounts: Vec<PathBuf>,
    pub min_size: u64,
    pub timeout: Duration,
}

/// Default for `min-size`.
pub const DEFAULT_MIN_SIZE: u64 = 2 << 20;
/// Default for `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for ReclaimConfig {
    fn default() -> Self {
        ReclaimConfig {
            every: None,
            mounts: Vec::new(),
            min_size: DEFAULT_MIN_SIZE,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// Reads the file; a missing file gives the defaults.
pub fn load(path: &Path) -> Result<ReclaimConfig, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ReclaimConfig::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Parses the file's text.
pub fn parse(text: &str) -> Result<ReclaimConfig, String> {
    let mut c = ReclaimConfig::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: not key=value", n + 1))?;
        let v = v.trim();
        let at = |e: String| format!("line {}: {e}", n + 1);
        match k.trim() {
            "every" => c.every = parse_every(v).map_err(at)?,
            "mount" => c.mounts.push(PathBuf::from(v)),
            "min-size" => c.min_size = parse_size(v).map_err(at)?,
            "timeout" => {
                c.timeout = parse_every(v)
                    .map_err(at)?
                    .ok_or_else(|| format!("line {}: timeout must be more than 0", n + 1))?;
            }
            k => return Err(format!("line {}: unknown key {k:?}", n + 1)),
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn periodic_reclaim_is_off_by_default_and_the_documented_example_parses() {
        assert_eq!(parse("").unwrap(), ReclaimConfig::default());
        assert_eq!(ReclaimConfig::default().every, None);
        // The shipped example is all comments: the defaults. Uncommented, it says what it shows.
        let shipped = include_str!("../daxvisor-agent.conf");
        assert_eq!(parse(shipped).unwrap(), ReclaimConfig::default());
        let example: String = shipped
            .lines()
            .map(|l| {
                l.strip_prefix('#')
                    .filter(|l| l.contains('=') && !l.contains(' '))
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n");
        let c = parse(&example).unwrap();
        assert_eq!(c.every, Some(Duration::from_secs(3600)));
        assert_eq!(c.mounts, vec![PathBuf::from("/mnt/pmem")]);
        assert_eq!(c.min_size, 2 << 20);
        assert_eq!(c.timeout, Duration::from_secs(30));
        assert!(parse("every=off").unwrap().every.is_none());
        assert!(parse("every=0").unwrap().every.is_none());
        assert!(parse("every=soon").is_err());
        assert!(parse("colour=blue").is_err());
        assert!(parse("timeout=0").is_err());
        assert!(load(Path::new("/nonexistent/daxvisor-agent.conf"))
            .unwrap()
            .every
            .is_none());
    }
}
