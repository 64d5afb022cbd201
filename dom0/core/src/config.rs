//! Domain configuration files: what the toolstack reads to create a domain,
//! like `xl create`'s, written in TOML.
//!
//! ```toml
//! name = "domu1"          # required: 1..=31 characters of a-z, 0-9, '-', '_'
//! kernel = "domu.elf"     # required: the image's module/file name
//! memory = "8M"           # required: bytes, or a K/M/G suffix; 1M..=1G, whole 4K pages
//! max_memory = "9M"       # optional: memory..=1G (default memory + 64K, at most 1G)
//! weight = 256            # optional: scheduler weight 1..=65535 (default 256)
//! cmdline = "x=1"         # optional: printable ASCII, at most 200 characters
//! kind = "pv"             # optional: "pv" | "hvm" | "auto" (default "auto")
//! disks = ["vda:0:1024"]  # optional: "name:start_sector:sectors" each
//! peer = "domu2"          # optional: a domain to pair with (a name, as `name`)
//! ```
//!
//! `peer`: when both domains exist at Dom0's start, the toolstack pairs them
//! through the store (each finds the other's id in `<home>/peer` and may read
//! the other's `<home>/pingpong/`): the demo's ping-pong and the event
//! ping-pong benchmark use it.
//!
//! A size is either a TOML integer (bytes) or a string of decimal digits
//! with an optional `K`, `M` or `G` suffix (binary multiples, either case).
//!
//! [`parse`] is strict: unknown keys, wrong value types and out-of-range
//! values are errors, each naming the file, the key and the problem
//! ([`ConfigError`]), so that a typo never silently becomes a default.
//! TOML syntax errors name the line and column. [`validate`] then checks the
//! configuration against the kernel image it names and decides how to start
//! it ([`LaunchKind`]).
//!
//! The TOML itself is read by the `toml` crate's parser (no_std + alloc,
//! without serde): we walk its spanned document tree ourselves so that every
//! message is ours.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use microhv_core::builder::{has_pv_note, pages_needed, parse_pv_image, BuildError};
use toml::de::{DeTable, DeValue};

/// Size of a guest page; memory sizes must be whole pages.
pub const PAGE_SIZE: u64 = 4096;
/// Longest domain name (the hypervisor's name field holds 31 bytes and a NUL).
pub const NAME_MAX: usize = 31;
/// Longest `kernel` value, in bytes.
pub const KERNEL_MAX: usize = 255;
/// Longest command line (`start_info` holds 255 bytes and a NUL).
pub const CMDLINE_MAX: usize = 200;
/// Smallest `memory`.
pub const MEMORY_MIN: u64 = 1 << 20;
/// Largest `memory` and `max_memory`.
pub const MEMORY_MAX: u64 = 1 << 30;
/// Default `max_memory` is `memory` plus this (but never above [`MEMORY_MAX`]).
pub const MAX_MEMORY_SLACK: u64 = 64 << 10;
/// Default scheduler weight.
pub const DEFAULT_WEIGHT: u16 = 256;
/// Longest disk name.
pub const DISK_NAME_MAX: usize = 15;
/// Most disks one domain may have.
pub const MAX_DISKS: usize = 16;
/// Largest configuration file accepted, in bytes.
pub const MAX_FILE_BYTES: usize = 64 << 10;

/// Every key a configuration file may have, in the order they are documented.
pub const KEYS: [&str; 9] = ["name", "kernel", "memory", "max_memory", "weight", "cmdline", "kind", "disks", "peer"];

/// How the configuration asks for the image to be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kind {
    /// As a PV guest: the image must carry the microhv PV note.
    Pv,
    /// As an HVM guest, whatever the image is.
    Hvm,
    /// PV if the image carries the PV note, HVM otherwise.
    #[default]
    Auto,
}

impl Kind {
    /// The spelling used in configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Pv => "pv",
            Kind::Hvm => "hvm",
            Kind::Auto => "auto",
        }
    }
}

/// One virtual disk: `sectors` sectors of the backing store from `start_sector`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub name: String,
    pub start_sector: u64,
    pub sectors: u64,
}

/// A parsed and checked domain configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainConfig {
    pub name: String,
    pub kernel: String,
    /// Initial memory, in 4 KiB pages.
    pub memory_pages: u64,
    /// Memory limit, in 4 KiB pages; at least `memory_pages`.
    pub max_pages: u64,
    pub weight: u16,
    /// Empty when the file has none.
    pub cmdline: String,
    pub kind: Kind,
    pub disks: Vec<Disk>,
    /// The domain to pair with through the store, if any.
    pub peer: Option<String>,
}

/// What is wrong with a configuration file. Displays as `<file>: <message>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The configuration file's name, as the caller gave it.
    pub file: String,
    /// What is wrong, naming the key (or line) and the problem.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file, self.message)
    }
}

impl core::error::Error for ConfigError {}

/// How [`validate`] decided to start the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchKind {
    Pv,
    Hvm,
}

/// Parses and checks a configuration file; `file_name` is only used in errors.
/// Never panics, whatever the text.
pub fn parse(file_name: &str, text: &str) -> Result<DomainConfig, ConfigError> {
    parse_text(text).map_err(|message| ConfigError { file: file_name.to_string(), message })
}

/// Decides how to start `image` (the contents of `cfg.kernel`) for `cfg`;
/// `file_name` (the configuration file's) is only used in errors.
///
/// * `kind = "pv"`: the image must be a valid microhv PV kernel.
/// * `kind = "auto"`: PV if the image carries the PV note (and then it must
///   be a valid PV kernel), HVM otherwise.
/// * `kind = "hvm"`: HVM, even for a PV kernel.
///
/// For PV, `memory` must hold the image and its boot layout
/// ([`pages_needed`]); for HVM it must at least hold the image file. An image
/// that is empty, or an ELF64 file that is cut short or malformed, is refused
/// whatever the kind.
pub fn validate(cfg: &DomainConfig, file_name: &str, image: &[u8]) -> Result<LaunchKind, ConfigError> {
    validate_inner(cfg, image).map_err(|message| ConfigError { file: file_name.to_string(), message })
}

fn validate_inner(cfg: &DomainConfig, image: &[u8]) -> Result<LaunchKind, String> {
    let kernel = &cfg.kernel;
    let memory = cfg.memory_pages.saturating_mul(PAGE_SIZE);
    let too_small = |needed_bytes: u64| {
        format!("memory {} is too small: the image needs {} KiB", fmt_size(memory), needed_bytes.div_ceil(1024))
    };
    let hvm = match cfg.kind {
        Kind::Pv => false,
        Kind::Hvm => true,
        Kind::Auto => !has_pv_note(image),
    };
    if hvm {
        if image.is_empty() {
            return Err(format!("{kernel}: the image is empty"));
        }
        // Not a PV kernel, so most of the PV checks do not apply (an ELF32
        // or non-ELF image may be a fine HVM kernel), but an ELF64 file that
        // is cut short or malformed is broken for any guest.
        if let Err(e @ (BuildError::Truncated | BuildError::Malformed(_))) = parse_pv_image(image) {
            return Err(format!("{kernel}: {e}"));
        }
        let len = u64::try_from(image.len()).unwrap_or(u64::MAX);
        if len > memory {
            return Err(too_small(len));
        }
        return Ok(LaunchKind::Hvm);
    }
    let pv = parse_pv_image(image).map_err(|e| match e {
        BuildError::NoPvNote => format!("{kernel}: not a PV image (no microhv ELF note)"),
        e => format!("{kernel}: {e}"),
    })?;
    let needed = pages_needed(&pv).map_err(|e| format!("{kernel}: {e}"))?;
    if cfg.memory_pages < needed {
        return Err(too_small(needed.saturating_mul(PAGE_SIZE)));
    }
    Ok(LaunchKind::Pv)
}

// ---- Parsing ----------------------------------------------------------------

/// The values found for each known key.
#[derive(Default)]
struct Fields<'a, 'i> {
    name: Option<&'a DeValue<'i>>,
    kernel: Option<&'a DeValue<'i>>,
    memory: Option<&'a DeValue<'i>>,
    max_memory: Option<&'a DeValue<'i>>,
    weight: Option<&'a DeValue<'i>>,
    cmdline: Option<&'a DeValue<'i>>,
    kind: Option<&'a DeValue<'i>>,
    disks: Option<&'a DeValue<'i>>,
    peer: Option<&'a DeValue<'i>>,
}

fn parse_text(text: &str) -> Result<DomainConfig, String> {
    if text.len() > MAX_FILE_BYTES {
        return Err(format!(
            "the file is {} bytes long; a configuration file may be at most {} KiB",
            text.len(),
            MAX_FILE_BYTES / 1024
        ));
    }
    let doc = DeTable::parse(text).map_err(|e| syntax_error(text, &e))?;
    let table: &DeTable<'_> = doc.get_ref();

    let mut f = Fields::default();
    // The first unknown key in the file (the table itself is sorted by key).
    let mut unknown: Option<(&str, usize)> = None;
    for (key, value) in table.iter() {
        let k: &str = key.get_ref();
        let slot = match k {
            "name" => &mut f.name,
            "kernel" => &mut f.kernel,
            "memory" => &mut f.memory,
            "max_memory" => &mut f.max_memory,
            "weight" => &mut f.weight,
            "cmdline" => &mut f.cmdline,
            "kind" => &mut f.kind,
            "disks" => &mut f.disks,
            "peer" => &mut f.peer,
            _ => {
                let at = key.span().start;
                if unknown.is_none_or(|(_, first)| at < first) {
                    unknown = Some((k, at));
                }
                continue;
            }
        };
        *slot = Some(value.get_ref());
    }
    if let Some((k, _)) = unknown {
        return Err(unknown_key(k));
    }

    let (Some(name), Some(kernel), Some(memory)) = (f.name, f.kernel, f.memory) else {
        let missing: Vec<&str> = [("name", f.name), ("kernel", f.kernel), ("memory", f.memory)]
            .into_iter()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k)
            .collect();
        return Err(missing_keys(&missing));
    };

    let name = string("name", name)?;
    check_name("name", name, NAME_MAX)?;

    let kernel = string("kernel", kernel)?;
    if kernel.is_empty() {
        return Err("kernel: must not be empty".to_string());
    }
    if kernel.len() > KERNEL_MAX {
        return Err(format!("kernel: {} is {} bytes long (at most {KERNEL_MAX})", Quoted(kernel), kernel.len()));
    }
    if let Some(c) = kernel.chars().find(|c| c.is_control()) {
        return Err(format!("kernel: {} contains the control character {c:?}", Quoted(kernel)));
    }

    let (memory_bytes, shown) = size("memory", memory)?;
    if memory_bytes < MEMORY_MIN {
        return Err(format!("memory: {shown} is too small (the minimum is {})", fmt_size(MEMORY_MIN)));
    }

    let max_bytes = match f.max_memory {
        None => memory_bytes.saturating_add(MAX_MEMORY_SLACK).min(MEMORY_MAX),
        Some(v) => {
            let (max, shown) = size("max_memory", v)?;
            if max < memory_bytes {
                return Err(format!("max_memory: {shown} is less than memory ({})", fmt_size(memory_bytes)));
            }
            max
        }
    };

    let weight = match f.weight {
        None => DEFAULT_WEIGHT,
        Some(v) => {
            let n = integer("weight", v)?;
            match u16::try_from(n) {
                Ok(w) if w >= 1 => w,
                _ => return Err(format!("weight: {n} is out of range (1..=65535)")),
            }
        }
    };

    let cmdline = match f.cmdline {
        None => String::new(),
        Some(v) => {
            let s = string("cmdline", v)?;
            if let Some(c) = s.chars().find(|c| !(' '..='~').contains(c)) {
                return Err(format!("cmdline: contains {c:?}; only printable ASCII is allowed"));
            }
            if s.len() > CMDLINE_MAX {
                return Err(format!("cmdline: is {} characters long (at most {CMDLINE_MAX})", s.len()));
            }
            s.to_string()
        }
    };

    let kind = match f.kind {
        None => Kind::Auto,
        Some(v) => match string("kind", v)? {
            "pv" => Kind::Pv,
            "hvm" => Kind::Hvm,
            "auto" => Kind::Auto,
            other => return Err(format!("kind: {} is not one of \"pv\", \"hvm\", \"auto\"", Quoted(other))),
        },
    };

    let disks = match f.disks {
        None => Vec::new(),
        Some(v) => disks(v)?,
    };

    let peer = match f.peer {
        None => None,
        Some(v) => {
            let p = string("peer", v)?;
            check_name("peer", p, NAME_MAX)?;
            if p == name {
                return Err(format!("peer: {} is this domain's own name", Quoted(p)));
            }
            Some(p.to_string())
        }
    };

    Ok(DomainConfig {
        name: name.to_string(),
        kernel: kernel.to_string(),
        memory_pages: memory_bytes / PAGE_SIZE,
        max_pages: max_bytes / PAGE_SIZE,
        weight,
        cmdline,
        kind,
        disks,
        peer,
    })
}

fn syntax_error(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let (line, column) = line_col(text, span.start);
            let what = e.message();
            match text.get(span) {
                // The parser does not say which key: the span does.
                Some(key) if what == "duplicate key" && !key.is_empty() => {
                    format!("line {line}, column {column}: duplicate key {}", Quoted(key))
                }
                _ => format!("line {line}, column {column}: {what}"),
            }
        }
        None => format!("not valid TOML: {}", e.message()),
    }
}

/// 1-based line and column (in characters) of byte offset `at`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..at.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    // Count UTF-8 lead bytes, so a column is a character.
    let column = before[line_start..].iter().filter(|&&b| b & 0xc0 != 0x80).count() + 1;
    (line, column)
}

fn unknown_key(key: &str) -> String {
    let close = KEYS.iter().copied().filter(|k| edit_distance(key, k) <= 2).min_by_key(|k| edit_distance(key, k));
    match close {
        Some(k) => format!("unknown key {} (did you mean '{k}'?)", Quoted(key)),
        None => format!("unknown key {} (known keys: {})", Quoted(key), KEYS.join(", ")),
    }
}

fn missing_keys(keys: &[&str]) -> String {
    let quoted: Vec<String> = keys.iter().map(|k| format!("'{k}'")).collect();
    match quoted.as_slice() {
        [one] => format!("missing required key {one}"),
        [init @ .., last] => format!("missing required keys {} and {last}", init.join(", ")),
        [] => "missing required keys".to_string(),
    }
}

/// Levenshtein distance, for suggesting a key; long keys are cut short (they
/// are never close to a known one anyway).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().take(32).collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = alloc::vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let subst = prev[j] + usize::from(ca != cb);
            cur[j + 1] = subst.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        core::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// `"a string"`, `"an integer"`, ... for a value's type.
fn a_type(v: &DeValue<'_>) -> String {
    let t = v.type_str();
    let article = if t.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    format!("{article} {t}")
}

fn type_error(key: &str, expected: &str, found: &DeValue<'_>) -> String {
    format!("{key}: expected {expected}, found {}", a_type(found))
}

fn string<'v>(key: &str, v: &'v DeValue<'_>) -> Result<&'v str, String> {
    v.as_str().ok_or_else(|| type_error(key, "a string", v))
}

fn integer(key: &str, v: &DeValue<'_>) -> Result<i128, String> {
    match v {
        DeValue::Integer(i) => {
            i128::from_str_radix(i.as_str(), i.radix()).map_err(|_| format!("{key}: {i} is out of range"))
        }
        _ => Err(type_error(key, "an integer", v)),
    }
}

/// A size value: bytes, and how the file wrote it (for messages). Checks
/// the syntax, whole pages and the upper bound; the caller checks the lower.
fn size(key: &str, v: &DeValue<'_>) -> Result<(u64, String), String> {
    let (parsed, shown) = match v {
        DeValue::String(s) => (parse_size(s), Quoted(s).to_string()),
        DeValue::Integer(_) => {
            let n = integer(key, v)?;
            let parsed = match u64::try_from(n) {
                Ok(b) => Ok(b),
                Err(_) if n < 0 => Err(SizeError::NotASize),
                Err(_) => Err(SizeError::TooLarge),
            };
            (parsed, n.to_string())
        }
        _ => return Err(type_error(key, "a size such as \"16M\"", v)),
    };
    let too_large = || format!("{key}: {shown} is too large (the maximum is {})", fmt_size(MEMORY_MAX));
    let bytes = match parsed {
        Ok(b) => b,
        Err(SizeError::NotASize) => return Err(format!("{key}: {shown} is not a size (use e.g. 16M)")),
        Err(SizeError::TooLarge) => return Err(too_large()),
    };
    if bytes > MEMORY_MAX {
        return Err(too_large());
    }
    if bytes % PAGE_SIZE != 0 {
        return Err(format!("{key}: {shown} is not a whole number of 4K pages"));
    }
    Ok((bytes, shown))
}

#[derive(Debug, PartialEq, Eq)]
enum SizeError {
    NotASize,
    TooLarge,
}

/// `"123"`, `"16K"`, `"8M"`, `"1G"` (either case) in bytes.
fn parse_size(s: &str) -> Result<u64, SizeError> {
    let (digits, unit) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n = decimal(digits).map_err(|e| match e {
        NumberError::NotANumber => SizeError::NotASize,
        NumberError::TooLarge => SizeError::TooLarge,
    })?;
    n.checked_mul(unit).ok_or(SizeError::TooLarge)
}

enum NumberError {
    NotANumber,
    TooLarge,
}

/// Plain decimal digits (no sign, no spaces, no underscores) as a `u64`.
fn decimal(s: &str) -> Result<u64, NumberError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NumberError::NotANumber);
    }
    // Only digits: the only possible failure is overflow.
    s.parse().map_err(|_| NumberError::TooLarge)
}

/// A size in the largest unit that divides it: `"1G"`, `"8M"`, `"68K"`, `"100"`.
fn fmt_size(bytes: u64) -> String {
    for (unit, suffix) in [(1u64 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")] {
        if bytes != 0 && bytes.is_multiple_of(unit) {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    bytes.to_string()
}

/// Checks a name of 1..=`max` characters from `[a-z0-9_-]`.
fn check_name(key: &str, s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("{key}: must not be empty"));
    }
    let len = s.chars().count();
    if len > max {
        return Err(format!("{key}: {} is {len} characters long (at most {max})", Quoted(s)));
    }
    if let Some(c) = s.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-' | '_')) {
        return Err(format!("{key}: {} contains {c:?}; use only a-z, 0-9, '-' and '_'", Quoted(s)));
    }
    Ok(())
}

fn disks(v: &DeValue<'_>) -> Result<Vec<Disk>, String> {
    const SPEC: &str = "\"name:start_sector:sectors\"";
    let Some(items) = v.as_array() else {
        return Err(type_error("disks", &format!("an array of {SPEC} strings"), v));
    };
    if items.len() > MAX_DISKS {
        return Err(format!("disks: {} disks given (at most {MAX_DISKS})", items.len()));
    }
    let mut out: Vec<Disk> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let key = format!("disks[{i}]");
        let spec = item.get_ref().as_str().ok_or_else(|| type_error(&key, &format!("a string {SPEC}"), item.get_ref()))?;
        let disk = disk(&key, spec)?;
        if let Some(j) = out.iter().position(|d| d.name == disk.name) {
            return Err(format!("{key}: disk '{}' is already defined by disks[{j}]", disk.name));
        }
        out.push(disk);
    }
    Ok(out)
}

fn disk(key: &str, spec: &str) -> Result<Disk, String> {
    let mut parts = spec.split(':');
    let (Some(name), Some(start), Some(sectors), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("{key}: {} is not name:start_sector:sectors (e.g. \"vda:0:1024\")", Quoted(spec)));
    };
    check_name(&format!("{key}: disk name"), name, DISK_NAME_MAX)?;
    let number = |what: &str, s: &str| {
        decimal(s).map_err(|e| match e {
            NumberError::NotANumber => format!("{key}: {what} {} is not a number", Quoted(s)),
            NumberError::TooLarge => format!("{key}: {what} {s} is too large"),
        })
    };
    let start_sector = number("start_sector", start)?;
    let sectors = number("sectors", sectors)?;
    if sectors == 0 {
        return Err(format!("{key}: {}: sectors must be at least 1", Quoted(spec)));
    }
    if start_sector.checked_add(sectors).is_none() {
        return Err(format!("{key}: {}: the disk ends past the last possible sector", Quoted(spec)));
    }
    Ok(Disk { name: name.to_string(), start_sector, sectors })
}

/// A value from the file in single quotes, escaped and cut to 40 characters.
struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX: usize = 40;
        f.write_str("'")?;
        for c in self.0.chars().take(MAX) {
            if c == '\'' || c == '"' {
                write!(f, "{c}")?;
            } else {
                write!(f, "{}", c.escape_debug())?;
            }
        }
        if self.0.chars().nth(MAX).is_some() {
            f.write_str("...")?;
        }
        f.write_str("'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use shared_abi::note::{NOTE_NAME, NOTE_TYPE_PV};
    use shared_abi::ABI_VERSION;

    const FULL: &str = r#"
# A complete configuration.
name = "domu1"
kernel = "domu.elf"
memory = "8M"
max_memory = "9M"
weight = 512
cmdline = "console=hvc0 x=1"
kind = "pv"
disks = ["vda:0:1024", "vdb:1024:2048"]
peer = "domu2"
"#;

    const MINIMAL: &str = "name = \"domu1\"\nkernel = \"domu.elf\"\nmemory = \"8M\"\n";

    /// `MINIMAL` plus `extra` lines.
    fn with(extra: &str) -> String {
        format!("{MINIMAL}{extra}\n")
    }

    #[test]
    fn peer_is_a_name_and_not_our_own() {
        assert_eq!(ok(&with("peer = \"bench-echo\"")).peer.as_deref(), Some("bench-echo"));
        assert_eq!(err(&with("peer = \"domu1\"")), "peer: 'domu1' is this domain's own name");
        assert!(err(&with("peer = \"a b\"")).starts_with("peer: "));
        assert!(err(&with("peer = 3")).starts_with("peer: expected a string"));
    }

    /// The message of the error `text` gives.
    fn err(text: &str) -> String {
        let e = parse("domu1.cfg", text).expect_err("should be refused");
        assert_eq!(e.file, "domu1.cfg");
        assert!(!e.message.is_empty() && !e.message.contains('\n'), "{e}");
        e.message
    }

    fn ok(text: &str) -> DomainConfig {
        parse("domu1.cfg", text).unwrap_or_else(|e| panic!("{e}"))
    }

    // ---- parse ----------------------------------------------------------

    #[test]
    fn a_full_configuration() {
        let c = ok(FULL);
        assert_eq!(
            c,
            DomainConfig {
                name: "domu1".into(),
                kernel: "domu.elf".into(),
                memory_pages: 2048,
                max_pages: 2304,
                weight: 512,
                cmdline: "console=hvc0 x=1".into(),
                kind: Kind::Pv,
                disks: alloc::vec![
                    Disk { name: "vda".into(), start_sector: 0, sectors: 1024 },
                    Disk { name: "vdb".into(), start_sector: 1024, sectors: 2048 },
                ],
                peer: Some("domu2".into()),
            }
        );
    }

    #[test]
    fn defaults() {
        let c = ok(MINIMAL);
        assert_eq!(c.memory_pages, 2048);
        assert_eq!(c.max_pages, 2048 + 16, "memory + 64K");
        assert_eq!(c.weight, DEFAULT_WEIGHT);
        assert_eq!(c.cmdline, "");
        assert_eq!(c.kind, Kind::Auto);
        assert!(c.disks.is_empty());
        assert_eq!(c.peer, None);
        // The default limit never goes past the largest memory.
        let c = ok("name = \"a\"\nkernel = \"k\"\nmemory = \"1G\"\n");
        assert_eq!((c.memory_pages, c.max_pages), (262_144, 262_144));
    }

    #[test]
    fn size_spellings() {
        let pages = |m: &str| ok(&format!("name = \"a\"\nkernel = \"k\"\nmemory = {m}\n")).memory_pages;
        assert_eq!(pages("\"1M\""), 256);
        assert_eq!(pages("\"1m\""), 256);
        assert_eq!(pages("\"1024K\""), 256);
        assert_eq!(pages("\"1g\""), 262_144);
        assert_eq!(pages("\"1048576\""), 256);
        assert_eq!(pages("1048576"), 256);
        assert_eq!(pages("1_048_576"), 256);
        assert_eq!(pages("0x100000"), 256);
        assert_eq!(pages("\"1052672\""), 257);
        assert_eq!(ok(&with("max_memory = \"8M\"")).max_pages, 2048, "max_memory may equal memory");
        assert_eq!(ok(&with("max_memory = \"1G\"")).max_pages, 262_144);
    }

    #[test]
    fn other_values_at_their_limits() {
        let c = ok(&format!(
            "name = \"{}\"\nkernel = \"images/domu.elf\"\nmemory = \"1M\"\nweight = 1\ncmdline = \"{}\"\nkind = \"hvm\"\ndisks = []\n",
            "a-_9".repeat(7) + "abc",
            "x".repeat(200)
        ));
        assert_eq!(c.name.len(), 31);
        assert_eq!((c.weight, c.kind, c.cmdline.len()), (1, Kind::Hvm, 200));
        assert_eq!(ok(&with("weight = 65535")).weight, 65535);
        assert_eq!(ok(&with("kind = \"auto\"")).kind, Kind::Auto);
        let c = ok(&with("disks = [\"xvda-1:18446744073709551614:1\"]"));
        assert_eq!(c.disks[0], Disk { name: "xvda-1".into(), start_sector: u64::MAX - 1, sectors: 1 });
        // Other TOML spellings of the same document.
        let c = ok("name = 'domu1'\n\"kernel\" = \"domu.elf\"  # comment\nmemory='8M'");
        assert_eq!(c.name, "domu1");
    }

    #[test]
    fn missing_required_keys_are_named() {
        assert_eq!(err("kernel = \"k\"\nmemory = \"8M\""), "missing required key 'name'");
        assert_eq!(err("name = \"a\"\nmemory = \"8M\""), "missing required key 'kernel'");
        assert_eq!(err("name = \"a\"\nkernel = \"k\""), "missing required key 'memory'");
        assert_eq!(err(""), "missing required keys 'name', 'kernel' and 'memory'");
        assert_eq!(err("# nothing\nweight = 3\n"), "missing required keys 'name', 'kernel' and 'memory'");
        assert_eq!(err("kernel = \"k\""), "missing required keys 'name' and 'memory'");
    }

    #[test]
    fn bad_sizes() {
        assert_eq!(err(&MINIMAL.replace("8M", "8X")), "memory: '8X' is not a size (use e.g. 16M)");
        assert_eq!(
            parse("domu1.cfg", &MINIMAL.replace("8M", "8X")).unwrap_err().to_string(),
            "domu1.cfg: memory: '8X' is not a size (use e.g. 16M)"
        );
        for bad in ["", "M", "8 M", " 8M", "8MB", "8MiB", "-8M", "+8M", "8.5M", "1_000", "0x100000", "８M"] {
            let m = err(&MINIMAL.replace("8M", bad));
            assert!(m.starts_with("memory: '") && m.ends_with("is not a size (use e.g. 16M)"), "{bad}: {m}");
        }
        assert_eq!(err(&MINIMAL.replace("\"8M\"", "-1")), "memory: -1 is not a size (use e.g. 16M)");
        assert_eq!(err(&MINIMAL.replace("8M", "1000000")), "memory: '1000000' is not a whole number of 4K pages");
        assert_eq!(err(&MINIMAL.replace("8M", "99999999999999999999G")), "memory: '99999999999999999999G' is too large (the maximum is 1G)");
        assert_eq!(err(&MINIMAL.replace("8M", "18014398509481984G")), "memory: '18014398509481984G' is too large (the maximum is 1G)");
        assert_eq!(err(&with("max_memory = \"x\"")), "max_memory: 'x' is not a size (use e.g. 16M)");
    }

    #[test]
    fn memory_too_small_or_too_large() {
        assert_eq!(err(&MINIMAL.replace("8M", "1020K")), "memory: '1020K' is too small (the minimum is 1M)");
        assert_eq!(err(&MINIMAL.replace("\"8M\"", "0")), "memory: 0 is too small (the minimum is 1M)");
        assert_eq!(err(&MINIMAL.replace("8M", "1025M")), "memory: '1025M' is too large (the maximum is 1G)");
        assert_eq!(err(&MINIMAL.replace("8M", "2G")), "memory: '2G' is too large (the maximum is 1G)");
        assert_eq!(err(&MINIMAL.replace("\"8M\"", "1073745920")), "memory: 1073745920 is too large (the maximum is 1G)");
        assert_eq!(err(&with("max_memory = \"2G\"")), "max_memory: '2G' is too large (the maximum is 1G)");
    }

    #[test]
    fn max_memory_below_memory() {
        assert_eq!(err(&with("max_memory = \"4M\"")), "max_memory: '4M' is less than memory (8M)");
        assert_eq!(err(&with("max_memory = 8384512")), "max_memory: 8384512 is less than memory (8M)");
    }

    #[test]
    fn bad_weights() {
        assert_eq!(err(&with("weight = 0")), "weight: 0 is out of range (1..=65535)");
        assert_eq!(err(&with("weight = 65536")), "weight: 65536 is out of range (1..=65535)");
        assert_eq!(err(&with("weight = -3")), "weight: -3 is out of range (1..=65535)");
        assert_eq!(err(&with("weight = \"256\"")), "weight: expected an integer, found a string");
        assert_eq!(err(&with("weight = 2.5")), "weight: expected an integer, found a float");
    }

    #[test]
    fn bad_kinds() {
        assert_eq!(err(&with("kind = \"xen\"")), "kind: 'xen' is not one of \"pv\", \"hvm\", \"auto\"");
        assert_eq!(err(&with("kind = \"PV\"")), "kind: 'PV' is not one of \"pv\", \"hvm\", \"auto\"");
        assert_eq!(err(&with("kind = true")), "kind: expected a string, found a boolean");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let text = "name = \"a\"\nkernel = \"k\"\nmemroy = \"8M\"\n";
        assert_eq!(err(text), "unknown key 'memroy' (did you mean 'memory'?)");
        assert_eq!(err(&with("maxmemory = \"9M\"")), "unknown key 'maxmemory' (did you mean 'max_memory'?)");
        assert_eq!(
            err(&with("vcpus = 2")),
            "unknown key 'vcpus' (known keys: name, kernel, memory, max_memory, weight, cmdline, kind, disks, peer)"
        );
        // The first in the file is reported, not the first alphabetically.
        assert!(err(&with("zz = 1\naa = 2")).starts_with("unknown key 'zz'"));
        // Tables are keys too.
        assert!(err(&with("[network]\nbridge = \"br0\"")).starts_with("unknown key 'network'"));
    }

    #[test]
    fn wrong_types() {
        assert_eq!(err("name = 1\nkernel = \"k\"\nmemory = \"8M\""), "name: expected a string, found an integer");
        assert_eq!(err("name = \"a\"\nkernel = [\"k\"]\nmemory = \"8M\""), "kernel: expected a string, found an array");
        assert_eq!(err(&MINIMAL.replace("\"8M\"", "true")), "memory: expected a size such as \"16M\", found a boolean");
        assert_eq!(err(&MINIMAL.replace("\"8M\"", "8.0")), "memory: expected a size such as \"16M\", found a float");
        assert_eq!(err(&MINIMAL.replace("memory = \"8M\"", "memory.size = \"8M\"")), "memory: expected a size such as \"16M\", found a table");
        assert_eq!(err(&with("cmdline = 1979-05-27")), "cmdline: expected a string, found a datetime");
        assert_eq!(err(&with("disks = \"vda:0:1\"")), "disks: expected an array of \"name:start_sector:sectors\" strings, found a string");
        assert_eq!(err(&with("disks = [1]")), "disks[0]: expected a string \"name:start_sector:sectors\", found an integer");
        assert_eq!(err(&with("max_memory = []")), "max_memory: expected a size such as \"16M\", found an array");
        assert_eq!(err(&with("weight = 99999999999999999999999")), "weight: 99999999999999999999999 is out of range (1..=65535)");
    }

    #[test]
    fn bad_disk_specs() {
        let e = |d: &str| err(&with(&format!("disks = [\"vda:0:8\", \"{d}\"]")));
        assert_eq!(e("vdb"), "disks[1]: 'vdb' is not name:start_sector:sectors (e.g. \"vda:0:1024\")");
        assert_eq!(e("vdb:0"), "disks[1]: 'vdb:0' is not name:start_sector:sectors (e.g. \"vda:0:1024\")");
        assert_eq!(e("vdb:0:1:2"), "disks[1]: 'vdb:0:1:2' is not name:start_sector:sectors (e.g. \"vda:0:1024\")");
        assert_eq!(e("vdb:x:10"), "disks[1]: start_sector 'x' is not a number");
        assert_eq!(e("vdb:0:-1"), "disks[1]: sectors '-1' is not a number");
        assert_eq!(e("vdb:0:"), "disks[1]: sectors '' is not a number");
        assert_eq!(e("vdb:0:99999999999999999999"), "disks[1]: sectors 99999999999999999999 is too large");
        assert_eq!(e("vdb:0:0"), "disks[1]: 'vdb:0:0': sectors must be at least 1");
        assert_eq!(e("vdb:18446744073709551615:1"), "disks[1]: 'vdb:18446744073709551615:1': the disk ends past the last possible sector");
        assert_eq!(e(":0:1"), "disks[1]: disk name: must not be empty");
        assert_eq!(e("VDB:0:1"), "disks[1]: disk name: 'VDB' contains 'V'; use only a-z, 0-9, '-' and '_'");
        assert_eq!(e("abcdefghijklmnop:0:1"), "disks[1]: disk name: 'abcdefghijklmnop' is 16 characters long (at most 15)");
        assert_eq!(e("vda:8:8"), "disks[1]: disk 'vda' is already defined by disks[0]");
        let many: Vec<String> = (0..17).map(|i| format!("\"d{i}:0:1\"")).collect();
        assert_eq!(err(&with(&format!("disks = [{}]", many.join(",")))), "disks: 17 disks given (at most 16)");
    }

    #[test]
    fn bad_cmdlines() {
        assert_eq!(err(&with(&format!("cmdline = \"{}\"", "x".repeat(201)))), "cmdline: is 201 characters long (at most 200)");
        assert_eq!(err(&with("cmdline = \"a\\tb\"")), "cmdline: contains '\\t'; only printable ASCII is allowed");
        assert_eq!(err(&with("cmdline = \"café\"")), "cmdline: contains 'é'; only printable ASCII is allowed");
    }

    #[test]
    fn bad_names() {
        let e = |n: &str| err(&MINIMAL.replace("domu1", n));
        assert_eq!(e(""), "name: must not be empty");
        assert_eq!(e("Dom U"), "name: 'Dom U' contains 'D'; use only a-z, 0-9, '-' and '_'");
        assert_eq!(e("dom u"), "name: 'dom u' contains ' '; use only a-z, 0-9, '-' and '_'");
        assert_eq!(e("dom.1"), "name: 'dom.1' contains '.'; use only a-z, 0-9, '-' and '_'");
        assert_eq!(e("dömu"), "name: 'dömu' contains 'ö'; use only a-z, 0-9, '-' and '_'");
        assert_eq!(e("a\\u0000b"), "name: 'a\\0b' contains '\\0'; use only a-z, 0-9, '-' and '_'");
        assert_eq!(e(&"a".repeat(32)), format!("name: '{}' is 32 characters long (at most 31)", "a".repeat(32)));
        // Long values are cut short in messages.
        assert_eq!(e(&"a".repeat(50)), format!("name: '{}...' is 50 characters long (at most 31)", "a".repeat(40)));
    }

    #[test]
    fn bad_kernels() {
        let e = |k: &str| err(&MINIMAL.replace("domu.elf", k));
        assert_eq!(e(""), "kernel: must not be empty");
        assert_eq!(e("a\\nb"), "kernel: 'a\\nb' contains the control character '\\n'");
        assert!(e(&"k".repeat(256)).ends_with("is 256 bytes long (at most 255)"));
    }

    #[test]
    fn toml_syntax_errors_name_the_line() {
        let m = err("name = \"domu1\"\nkernel = \"domu.elf\nmemory = \"8M\"\n");
        assert!(m.starts_with("line 2, column "), "{m}");
        let m = err("name = \"domu1\"\nname = \"domu2\"\nkernel = \"k\"\nmemory = \"8M\"\n");
        assert_eq!(m, "line 2, column 1: duplicate key 'name'");
        let m = err("[a]\nb = 1\n[a]\n");
        assert_eq!(m, "line 3, column 2: duplicate key 'a'");
        let m = err("memory = 8M\n");
        assert!(m.starts_with("line 1, column 10: "), "{m}");
        let m = err("ä = = 1");
        assert!(m.starts_with("line 1, column "), "{m}");
        assert!(err(&"x".repeat(MAX_FILE_BYTES + 1)).contains("at most 64 KiB"));
    }

    #[test]
    fn helpers() {
        assert_eq!(fmt_size(1 << 30), "1G");
        assert_eq!(fmt_size(9 << 20), "9M");
        assert_eq!(fmt_size((8 << 20) + (64 << 10)), "8256K");
        assert_eq!(fmt_size(4097), "4097");
        assert_eq!(fmt_size(0), "0");
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("ab", 99), (1, 3));
        assert_eq!(edit_distance("memroy", "memory"), 2);
        assert_eq!(edit_distance("", "kind"), 4);
        assert_eq!(Kind::Hvm.as_str(), "hvm");
    }

    // ---- validate -------------------------------------------------------

    const VA: u64 = 0x40_0000;
    const TEXT_OFF: usize = 0x100;
    const TEXT_LEN: usize = 0x40;

    /// A minimal ELF64 x86-64 executable: one RX `PT_LOAD` of `TEXT_LEN`
    /// file bytes plus `bss` zero bytes, and (if `note`) a `PT_NOTE` with the
    /// microhv PV note. The entry point is the start of the segment.
    fn elf(note: bool, bss: u64) -> Vec<u8> {
        fn put(f: &mut [u8], at: usize, bytes: &[u8]) {
            f[at..at + bytes.len()].copy_from_slice(bytes);
        }
        let mut f = alloc::vec![0u8; TEXT_OFF + TEXT_LEN];
        put(&mut f, 0, b"\x7fELF");
        f[4] = 2; // ELFCLASS64
        f[5] = 1; // little-endian
        f[6] = 1; // EV_CURRENT
        put(&mut f, 16, &2u16.to_le_bytes()); // ET_EXEC
        put(&mut f, 18, &62u16.to_le_bytes()); // EM_X86_64
        put(&mut f, 20, &1u32.to_le_bytes());
        put(&mut f, 24, &VA.to_le_bytes()); // e_entry
        put(&mut f, 32, &64u64.to_le_bytes()); // e_phoff
        put(&mut f, 52, &64u16.to_le_bytes()); // e_ehsize
        put(&mut f, 54, &56u16.to_le_bytes()); // e_phentsize
        put(&mut f, 56, &(1 + u16::from(note)).to_le_bytes()); // e_phnum
        put(&mut f, 58, &64u16.to_le_bytes()); // e_shentsize

        let phdr = |f: &mut [u8], at: usize, ptype: u32, flags: u32, off: usize, va: u64, filesz: usize, memsz: u64, align: u64| {
            put(f, at, &ptype.to_le_bytes());
            put(f, at + 4, &flags.to_le_bytes());
            put(f, at + 8, &(off as u64).to_le_bytes());
            put(f, at + 16, &va.to_le_bytes());
            put(f, at + 24, &va.to_le_bytes());
            put(f, at + 32, &(filesz as u64).to_le_bytes());
            put(f, at + 40, &memsz.to_le_bytes());
            put(f, at + 48, &align.to_le_bytes());
        };
        phdr(&mut f, 64, 1, 5, TEXT_OFF, VA, TEXT_LEN, TEXT_LEN as u64 + bss, 0x1000); // PT_LOAD, R+X
        if note {
            let at = 64 + 56 * 2;
            phdr(&mut f, 120, 4, 4, at, 0, 24, 0, 4); // PT_NOTE
            put(&mut f, at, &(NOTE_NAME.len() as u32).to_le_bytes());
            put(&mut f, at + 4, &4u32.to_le_bytes());
            put(&mut f, at + 8, &NOTE_TYPE_PV.to_le_bytes());
            put(&mut f, at + 12, NOTE_NAME);
            put(&mut f, at + 20, &u32::from(ABI_VERSION.0).to_le_bytes());
        }
        for b in &mut f[TEXT_OFF..] {
            *b = 0x90; // nop
        }
        f
    }

    fn cfg(kind: Kind, memory_pages: u64) -> DomainConfig {
        DomainConfig {
            name: "domu1".into(),
            kernel: "domu.elf".into(),
            memory_pages,
            max_pages: memory_pages + 16,
            weight: 256,
            cmdline: String::new(),
            kind,
            disks: Vec::new(),
            peer: None,
        }
    }

    fn verr(c: &DomainConfig, image: &[u8]) -> String {
        let e = validate(c, "domu1.cfg", image).expect_err("should be refused");
        assert_eq!(e.file, "domu1.cfg");
        e.message
    }

    #[test]
    fn the_test_images_are_what_they_claim() {
        assert!(has_pv_note(&elf(true, 0)));
        assert!(parse_pv_image(&elf(true, 0)).is_ok());
        assert!(!has_pv_note(&elf(false, 0)));
        assert_eq!(parse_pv_image(&elf(false, 0)), Err(BuildError::NoPvNote));
    }

    #[test]
    fn a_pv_image_starts_as_pv() {
        let image = elf(true, 0);
        assert_eq!(validate(&cfg(Kind::Pv, 256), "c", &image), Ok(LaunchKind::Pv));
        assert_eq!(validate(&cfg(Kind::Auto, 256), "c", &image), Ok(LaunchKind::Pv));
        assert_eq!(validate(&cfg(Kind::Hvm, 256), "c", &image), Ok(LaunchKind::Hvm), "hvm is honoured");
        // Parsed configurations work the same.
        assert_eq!(validate(&ok(FULL), "domu1.cfg", &image), Ok(LaunchKind::Pv));
    }

    #[test]
    fn without_the_note() {
        let image = elf(false, 0);
        assert_eq!(verr(&cfg(Kind::Pv, 256), &image), "domu.elf: not a PV image (no microhv ELF note)");
        assert_eq!(
            validate(&cfg(Kind::Pv, 256), "domu1.cfg", &image).unwrap_err().to_string(),
            "domu1.cfg: domu.elf: not a PV image (no microhv ELF note)"
        );
        assert_eq!(validate(&cfg(Kind::Auto, 256), "c", &image), Ok(LaunchKind::Hvm));
        assert_eq!(validate(&cfg(Kind::Hvm, 256), "c", &image), Ok(LaunchKind::Hvm));
        // Not ELF at all: fine for HVM, not PV.
        assert_eq!(validate(&cfg(Kind::Auto, 256), "c", b"raw kernel"), Ok(LaunchKind::Hvm));
        assert_eq!(verr(&cfg(Kind::Pv, 256), b"raw kernel"), "domu.elf: not an ELF file (bad magic)");
        assert_eq!(verr(&cfg(Kind::Auto, 256), b""), "domu.elf: the image is empty");
    }

    #[test]
    fn a_truncated_image_is_refused() {
        let image = elf(true, 0);
        let cut_text = &image[..TEXT_OFF + 8]; // the note survives, the segment does not
        let truncated = "domu.elf: ELF file truncated: a header, segment or note lies past its end";
        for kind in [Kind::Pv, Kind::Auto, Kind::Hvm] {
            assert_eq!(verr(&cfg(kind, 256), cut_text), truncated, "{kind:?}");
        }
        let cut_phdrs = &image[..100]; // the program headers are cut: no note to be seen
        assert_eq!(verr(&cfg(Kind::Pv, 256), cut_phdrs), truncated);
        assert_eq!(verr(&cfg(Kind::Auto, 256), cut_phdrs), truncated);
        // Every cut is refused, with the builder's own text.
        for len in 1..image.len() {
            let m = verr(&cfg(Kind::Pv, 256), &image[..len]);
            assert!(m.starts_with("domu.elf: "), "{len}: {m}");
        }
    }

    #[test]
    fn a_wrong_architecture_is_refused() {
        let mut image = elf(true, 0);
        image[18..20].copy_from_slice(&3u16.to_le_bytes()); // EM_386
        for kind in [Kind::Pv, Kind::Auto] {
            assert_eq!(verr(&cfg(kind, 256), &image), "domu.elf: ELF file is not for x86-64");
        }
    }

    #[test]
    fn memory_too_small_for_the_image() {
        let image = elf(true, 1 << 20); // a 1M bss
        let need = pages_needed(&parse_pv_image(&image).unwrap()).unwrap();
        assert!(need > 256);
        assert_eq!(verr(&cfg(Kind::Pv, 256), &image), format!("memory 1M is too small: the image needs {} KiB", need * 4));
        assert_eq!(verr(&cfg(Kind::Auto, need - 1), &image), format!("memory {}K is too small: the image needs {} KiB", (need - 1) * 4, need * 4));
        assert_eq!(validate(&cfg(Kind::Pv, need), "c", &image), Ok(LaunchKind::Pv));
        // HVM: the file itself must fit.
        let big = alloc::vec![0u8; (1 << 20) + 1];
        assert_eq!(verr(&cfg(Kind::Hvm, 256), &big), "memory 1M is too small: the image needs 1025 KiB");
    }

    // ---- never panics ---------------------------------------------------

    /// Configuration files that are often right and often almost right:
    /// each key present or not, its value usually plausible, now and then
    /// wrong, plus the odd stray line.
    fn config_text() -> impl Strategy<Value = String> {
        let odd = || "(true|1\\.5|1979-05-27|\\{\\}|\\[\\]|\"\"|'pv'|\"auto\"|0|-1|65535|65536|\"[a-zA-Z0-9 _.:-]{0,40}\")";
        let size = || prop_oneof![6 => "\"[1-9][0-9]{0,2}M\"", 2 => "\"[1-9][0-9]{0,3}[KMG]\"", 1 => "\"[0-9]{0,22}[KMGkmgX]?\"", 1 => "-?[0-9]{1,25}", 1 => odd()];
        let name = || prop_oneof![6 => "\"[a-z0-9_-]{1,35}\"", 1 => odd()];
        let disks = prop_oneof![
            4 => "\\[(\"[a-z]{1,5}:[0-9]{1,5}:[0-9]{1,5}\", ?){0,3}\\]",
            1 => "\\[(\"[a-z]{0,17}:[0-9x-]{0,22}:[0-9]{0,22}\", ?){0,4}\\]",
            1 => odd(),
        ];
        let line = |key: &'static str, p: f64, value: BoxedStrategy<String>| {
            proptest::option::weighted(p, value).prop_map(move |v| v.map(|v| format!("{key} = {v}\n")).unwrap_or_default())
        };
        let stray = proptest::option::weighted(0.1, "[a-z_]{1,12} = .{0,20}").prop_map(|v| v.unwrap_or_default());
        (
            line("name", 0.95, name().boxed()),
            line("kernel", 0.95, prop_oneof![6 => "\"[a-z./_-]{1,20}\"", 1 => odd()].boxed()),
            line("memory", 0.95, size().boxed()),
            line("max_memory", 0.5, size().boxed()),
            line("weight", 0.5, prop_oneof![4 => (1u32..70_000).prop_map(|w| w.to_string()), 1 => odd()].boxed()),
            line("cmdline", 0.5, prop_oneof![4 => "\"[ -~&&[^\"\\\\]]{0,210}\"", 1 => odd()].boxed()),
            line("kind", 0.5, prop_oneof![4 => "\"(pv|hvm|auto)\"", 1 => odd()].boxed()),
            line("disks", 0.5, disks.boxed()),
            stray,
        )
            .prop_map(|(a, b, c, d, e, f, g, h, i)| [a, b, c, d, e, f, g, h, i].concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn random_text_never_panics(text in ".{0,300}") {
            let _ = parse("f.cfg", &text);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse("f.cfg", &String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn configuration_like_text_never_panics(text in config_text()) {
            match parse("f.cfg", &text) {
                Ok(c) => {
                    prop_assert!((256..=262_144).contains(&c.memory_pages));
                    prop_assert!(c.memory_pages <= c.max_pages && c.max_pages <= 262_144);
                    prop_assert!(c.weight >= 1);
                    prop_assert!(!c.name.is_empty() && c.name.len() <= NAME_MAX);
                    prop_assert!(c.disks.iter().all(|d| d.sectors > 0));
                    let _ = validate(&c, "f.cfg", &elf(true, 0));
                }
                Err(e) => {
                    prop_assert!(!e.message.is_empty());
                    prop_assert!(!e.message.contains('\n'), "{}", e.message);
                }
            }
        }
    }
}
