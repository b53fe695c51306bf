//! The test guest's command line (BootInfo.cmdline, what `daxvisor run --cmdline` passed): whitespace-separated
//! `key=value` options, all optional. See the crate documentation for what each mode prints.
//!
//! | option | meaning | default |
//! |---|---|---|
//! | `exit=N` | exit status on success, 0..=255 | 0 |
//! | `pmem=MODE` | `write`, `write-flush-spin`, `write-loop`, `readonly-write`, `malformed`, `bench`, `flush-flood` | none: probe only |
//! | `size=N[K\|M\|G]` | bytes to write per pmem device (rounded down to 8) | whole region (`readonly-write`: 4K) |
//! | `seed=N` | pattern seed, 0..=0xffff_ffff | 0 |
//! | `mib=N` | MiB written by `pmem=bench` (capped to the region) | 64 |
//! | `agent=MODE` | `hello`, `shared`, `exclusive-pin`, `hostile`, `bench`, `offer` (see [`crate::modes::agent`]) | none |
//! | `breaks=N` | break notices `agent=shared` answers | 1 |
//! | `hold=S` | seconds `agent=exclusive-pin` holds its pin, then waits after closing the port; seconds `agent=offer` keeps its session open | 3 |
//! | `rounds=N` | acquire+release round trips of `agent=bench` | 1000 |
//! | `hotplug=N` | rounds of hot add and remove over virtio-pci (see [`crate::modes::hotplug`]) | 0 |
//! | `hotplug-ignore=1` | never acknowledge an eject request | off |
//! | `hotplug-pin=1` | pin the first added region through the agent port before its eject request | off |
//! | `pci=hostile` | over virtio-pci: garbage into every non-pmem function's configuration space, BAR 0 and MSI-X table before the pmem modes (see [`crate::modes::pci_hostile`]) | none |
//!
//! Options whose key contains a dot (`virtio_mmio.device=...`, kernel module parameters a VMM may append for
//! Linux) are ignored. Anything else unknown is an error, so a typo in a test does not silently run another mode.

/// What to do with the virtio-pmem devices after the probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PmemMode {
    /// Write the pattern, flush, read back, report.
    Write,
    /// Write the pattern, flush, report the acknowledgement, then spin forever (the test kills the VMM).
    WriteFlushSpin,
    /// Write the pattern and flush, over and over, on the first pmem device, forever (the test stops the VMM or
    /// shrinks the file under it). Reports the first passes.
    WriteLoop,
    /// Try to write into a (read-only) region, flush, report what reads back.
    ReadonlyWrite,
    /// Send malformed requests, then check the device still answers a good flush.
    Malformed,
    /// Time writes into the region with the TSC.
    Bench,
    /// Flush the first device back to back forever (the test stops the VMM).
    FlushFlood,
}

impl PmemMode {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "write" => PmemMode::Write,
            "write-flush-spin" => PmemMode::WriteFlushSpin,
            "write-loop" => PmemMode::WriteLoop,
            "readonly-write" => PmemMode::ReadonlyWrite,
            "malformed" => PmemMode::Malformed,
            "bench" => PmemMode::Bench,
            "flush-flood" => PmemMode::FlushFlood,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            PmemMode::Write => "write",
            PmemMode::WriteFlushSpin => "write-flush-spin",
            PmemMode::WriteLoop => "write-loop",
            PmemMode::ReadonlyWrite => "readonly-write",
            PmemMode::Malformed => "malformed",
            PmemMode::Bench => "bench",
            PmemMode::FlushFlood => "flush-flood",
        }
    }
}

/// What to do on the agent port after the pmem modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentMode {
    Hello,
    Shared,
    ExclusivePin,
    Hostile,
    Bench,
    Offer,
}

impl AgentMode {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "hello" => AgentMode::Hello,
            "shared" => AgentMode::Shared,
            "exclusive-pin" => AgentMode::ExclusivePin,
            "hostile" => AgentMode::Hostile,
            "bench" => AgentMode::Bench,
            "offer" => AgentMode::Offer,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    pub exit: u32,
    pub pmem: Option<PmemMode>,
    pub size: Option<u64>,
    pub seed: u32,
    pub bench_mib: u64,
    pub agent: Option<AgentMode>,
    pub breaks: u64,
    pub hold_s: u64,
    pub rounds: u64,
    pub pci_hostile: bool,
    /// `hotplug=N`: rounds of hot add and remove (0: none).
    pub hotplug: u64,
    /// `hotplug-ignore=1`: never acknowledge an eject.
    pub hotplug_ignore: bool,
    /// `hotplug-pin=1`: pin the first added region through the agent before its eject request.
    pub hotplug_pin: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            exit: 0,
            pmem: None,
            size: None,
            seed: 0,
            bench_mib: 64,
            agent: None,
            breaks: 1,
            hold_s: 3,
            rounds: 1000,
            pci_hostile: false,
            hotplug: 0,
            hotplug_ignore: false,
            hotplug_pin: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmdlineError<'a> {
    NotUtf8,
    /// A token without `=`.
    NotKeyValue(&'a str),
    UnknownOption(&'a str),
    BadValue {
        key: &'a str,
        value: &'a str,
    },
}

impl core::fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CmdlineError::NotUtf8 => write!(f, "not UTF-8"),
            CmdlineError::NotKeyValue(t) => write!(f, "\"{t}\" is not key=value"),
            CmdlineError::UnknownOption(k) => write!(f, "unknown option \"{k}\""),
            CmdlineError::BadValue { key, value } => write!(f, "bad value \"{value}\" for {key}"),
        }
    }
}

pub fn parse(raw: &[u8]) -> Result<Options, CmdlineError<'_>> {
    let text = core::str::from_utf8(raw).map_err(|_| CmdlineError::NotUtf8)?;
    let mut opts = Options::default();
    for token in text.split_ascii_whitespace() {
        let (key, value) = token
            .split_once('=')
            .ok_or(CmdlineError::NotKeyValue(token))?;
        let bad = CmdlineError::BadValue { key, value };
        match key {
            "exit" => opts.exit = parse_int(value).filter(|&v| v <= 255).ok_or(bad)? as u32,
            "pmem" => opts.pmem = Some(PmemMode::parse(value).ok_or(bad)?),
            "size" => opts.size = Some(parse_size(value).filter(|&v| v >= 8).ok_or(bad)?),
            "seed" => {
                opts.seed = parse_int(value)
                    .filter(|&v| v <= u32::MAX as u64)
                    .ok_or(bad)? as u32
            }
            "mib" => {
                opts.bench_mib = parse_int(value)
                    .filter(|&v| (1..=1 << 20).contains(&v))
                    .ok_or(bad)?
            }
            "agent" => opts.agent = Some(AgentMode::parse(value).ok_or(bad)?),
            "breaks" => {
                opts.breaks = parse_int(value)
                    .filter(|&v| (1..=1_000_000).contains(&v))
                    .ok_or(bad)?
            }
            "hold" => opts.hold_s = parse_int(value).filter(|&v| v <= 3600).ok_or(bad)?,
            "rounds" => {
                opts.rounds = parse_int(value)
                    .filter(|&v| (1..=10_000_000).contains(&v))
                    .ok_or(bad)?
            }
            "pci" if value == "hostile" => opts.pci_hostile = true,
            "hotplug" => opts.hotplug = parse_int(value).filter(|&v| v <= 1000).ok_or(bad)?,
            "hotplug-ignore" => opts.hotplug_ignore = value == "1",
            "hotplug-pin" => opts.hotplug_pin = value == "1",
            k if k.contains('.') => {}
            _ => return Err(CmdlineError::UnknownOption(key)),
        }
    }
    Ok(opts)
}

/// Decimal, or hexadecimal with `0x`.
fn parse_int(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// An integer with an optional binary suffix K, M or G (either case).
fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    parse_int(digits)?.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_probe_only_exit_zero() {
        assert_eq!(parse(b"").unwrap(), Options::default());
        assert_eq!(parse(b"  ").unwrap(), Options::default());
    }

    #[test]
    fn all_options() {
        let o = parse(b"exit=3 pmem=write-flush-spin size=2M seed=0x10 mib=8").unwrap();
        assert_eq!(o.exit, 3);
        assert_eq!(o.pmem, Some(PmemMode::WriteFlushSpin));
        assert_eq!(o.size, Some(2 << 20));
        assert_eq!(o.seed, 16);
        assert_eq!(o.bench_mib, 8);
        for (m, mode) in [
            ("write", PmemMode::Write),
            ("readonly-write", PmemMode::ReadonlyWrite),
            ("write-loop", PmemMode::WriteLoop),
            ("malformed", PmemMode::Malformed),
            ("bench", PmemMode::Bench),
            ("flush-flood", PmemMode::FlushFlood),
        ] {
            let line = format!("pmem={m}");
            assert_eq!(parse(line.as_bytes()).unwrap().pmem, Some(mode));
            assert_eq!(mode.name(), m);
        }
    }

    #[test]
    fn agent_options() {
        let o = parse(b"agent=shared breaks=1000 hold=5 rounds=20").unwrap();
        assert_eq!(o.agent, Some(AgentMode::Shared));
        assert_eq!((o.breaks, o.hold_s, o.rounds), (1000, 5, 20));
        for (m, mode) in [
            ("hello", AgentMode::Hello),
            ("exclusive-pin", AgentMode::ExclusivePin),
            ("hostile", AgentMode::Hostile),
            ("bench", AgentMode::Bench),
            ("offer", AgentMode::Offer),
        ] {
            let line = format!("agent={m}");
            assert_eq!(parse(line.as_bytes()).unwrap().agent, Some(mode));
        }
        assert!(parse(b"agent=nope").is_err());
        assert!(parse(b"breaks=0").is_err());
    }

    #[test]
    fn module_parameters_are_ignored() {
        let o = parse(b"virtio_mmio.device=4K@0xd0000000:5 exit=7").unwrap();
        assert_eq!(o.exit, 7);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert_eq!(
            parse(b"exit=256"),
            Err(CmdlineError::BadValue {
                key: "exit",
                value: "256"
            })
        );
        assert_eq!(
            parse(b"exit=-1"),
            Err(CmdlineError::BadValue {
                key: "exit",
                value: "-1"
            })
        );
        assert_eq!(
            parse(b"pmem=wrte"),
            Err(CmdlineError::BadValue {
                key: "pmem",
                value: "wrte"
            })
        );
        assert_eq!(
            parse(b"size=4"),
            Err(CmdlineError::BadValue {
                key: "size",
                value: "4"
            })
        );
        assert_eq!(
            parse(b"size=99999999999G").unwrap_err(),
            CmdlineError::BadValue {
                key: "size",
                value: "99999999999G"
            }
        );
        assert_eq!(
            parse(b"mib=0").unwrap_err(),
            CmdlineError::BadValue {
                key: "mib",
                value: "0"
            }
        );
        assert_eq!(parse(b"exti=3"), Err(CmdlineError::UnknownOption("exti")));
        assert_eq!(parse(b"quiet"), Err(CmdlineError::NotKeyValue("quiet")));
        assert_eq!(parse(b"exit=\xff"), Err(CmdlineError::NotUtf8));
    }
}
