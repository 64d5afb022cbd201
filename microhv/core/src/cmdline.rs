//! The hypervisor command line: whitespace-separated `key=value` words and
//! bare flags, e.g. `loglevel=debug microhv.fault=pagefault`.

/// A borrowed view of a command line.
#[derive(Clone, Copy, Debug)]
pub struct Cmdline<'a>(pub &'a str);

impl<'a> Cmdline<'a> {
    /// The value of the last `key=value` word for `key`.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.0
            .split_ascii_whitespace()
            .filter_map(|w| w.split_once('='))
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .next_back()
    }

    /// True when `key` appears as a bare word or as `key=1|on|yes|true`.
    pub fn flag(&self, key: &str) -> bool {
        self.0.split_ascii_whitespace().any(|w| w == key)
            || matches!(self.get(key), Some("1" | "on" | "yes" | "true"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_values_and_flags() {
        let c = Cmdline("/boot/microhv.elf loglevel=debug quiet microhv.fault=pf loglevel=trace x=");
        assert_eq!(c.get("loglevel"), Some("trace"));
        assert_eq!(c.get("microhv.fault"), Some("pf"));
        assert_eq!(c.get("x"), Some(""));
        assert_eq!(c.get("nothing"), None);
        assert!(c.flag("quiet"));
        assert!(!c.flag("loud"));
    }
}
