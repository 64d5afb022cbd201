//! xtask as a library: building the bare-metal images, making sure the tools
//! are installed, and booting QEMU with a timeout and a readable outcome.
//! The `xtask` binary and the system tests in `tests/` both use it.

pub mod abidoc;
pub mod bench;

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const KERNEL_TARGET: &str = "x86_64-unknown-none";

/// The repository root (xtask lives one level below it).
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent directory").to_path_buf()
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Adds the bare-metal target with rustup when it is missing.
pub fn ensure_target() -> Result<()> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(project_root())
        .output()
        .context("running `rustup target list --installed` (is rustup installed?)")?;
    if String::from_utf8_lossy(&out.stdout).lines().any(|l| l.trim() == KERNEL_TARGET) {
        return Ok(());
    }
    eprintln!("xtask: installing the Rust target {KERNEL_TARGET} (rustup target add {KERNEL_TARGET})");
    let ok = Command::new("rustup")
        .args(["target", "add", KERNEL_TARGET])
        .current_dir(project_root())
        .status()?
        .success();
    if !ok {
        bail!("could not install the target; run: rustup target add {KERNEL_TARGET}");
    }
    Ok(())
}

/// Installs Debian packages when running as root; otherwise says what to run.
pub fn ensure_packages(commands_and_packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = commands_and_packages
        .iter()
        .filter(|(cmd, _)| if cmd.starts_with('/') { !Path::new(cmd).exists() } else { !have(cmd) })
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if is_root() && have("apt-get") {
        eprintln!("xtask: installing Debian packages: {list}");
        let run = |args: &[&str]| -> Result<bool> {
            Ok(Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive").status()?.success())
        };
        let mut args = vec!["install", "-y", "--no-install-recommends"];
        args.extend(missing.iter());
        if !run(&args)? {
            // The package lists may be stale on a fresh machine.
            if !(run(&["update"])? && run(&args)?) {
                bail!("apt-get could not install: {list}");
            }
        }
        return Ok(());
    }
    bail!("missing tools; install them with: sudo apt-get install -y {list}");
}

pub fn ensure_qemu() -> Result<()> {
    ensure_packages(&[("qemu-system-x86_64", "qemu-system-x86"), ("qemu-img", "qemu-utils")])
}

/// Paths of the bootable images.
#[derive(Debug, Clone)]
pub struct Images {
    pub dir: PathBuf,
    pub microhv: PathBuf,
    pub dom0: PathBuf,
    pub domu: PathBuf,
    /// The hostile test guest (attack chosen by `attack=` on its module line).
    pub hostile: PathBuf,
    /// The HVM flavour of the demo DomU (a plain multiboot kernel).
    pub domu_hvm: PathBuf,
}

impl Images {
    pub fn in_dir(dir: &Path) -> Images {
        Images {
            dir: dir.to_path_buf(),
            microhv: dir.join("microhv.elf"),
            dom0: dir.join("dom0.elf"),
            domu: dir.join("domu.elf"),
            hostile: dir.join("hostile.elf"),
            domu_hvm: dir.join("domu-hvm.elf"),
        }
    }
}

/// Builds microhv, dom0 and domu-kernel for the bare-metal target and copies
/// them to `target/images/<profile>/`. Uses its own target directory, so it
/// can run while another cargo holds the main one (as `cargo test` does).
pub fn build_images(release: bool) -> Result<Images> {
    ensure_target()?;
    let root = project_root();
    kernel_build(&root, "target/kernel", &["-p", "microhv", "-p", "dom0", "-p", "domu-kernel", "-p", "hostile-guest"], release, "the kernel images")?;
    let profile = if release { "release" } else { "debug" };
    let built = root.join("target/kernel").join(KERNEL_TARGET).join(profile);
    let out = root.join("target/images").join(profile);
    std::fs::create_dir_all(&out)?;
    let images = Images::in_dir(&out);
    // Dom0's toolstack configurations travel as boot modules too.
    for entry in std::fs::read_dir(root.join("dom0/configs"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            std::fs::copy(&path, out.join(path.file_name().expect("file name")))?;
        }
    }
    // The HVM flavour of the demo DomU (same crate, feature `hvm`), in its
    // own target directory so the PV build keeps its features.
    kernel_build(&root, "target/kernel-hvm", &["-p", "domu-kernel", "--no-default-features", "--features", "hvm"], release, "the HVM demo guest")?;
    std::fs::copy(root.join("target/kernel-hvm").join(KERNEL_TARGET).join(profile).join("domu-kernel"), &images.domu_hvm)
        .context("copying the HVM demo guest")?;
    for (from, to) in [
        ("microhv", &images.microhv),
        ("dom0", &images.dom0),
        ("domu-kernel", &images.domu),
        ("hostile-guest", &images.hostile),
    ] {
        std::fs::copy(built.join(from), to).with_context(|| format!("copying {from} to {}", to.display()))?;
    }
    Ok(images)
}

/// `cargo build` of `args` for the bare-metal target into `target_dir`.
fn kernel_build(root: &Path, target_dir: &str, args: &[&str], release: bool, what: &str) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root).args(["build", "--target", KERNEL_TARGET, "--target-dir", target_dir]).args(args);
    if release {
        cmd.arg("--release");
    }
    // Host-only settings from the environment must not leak into kernel builds.
    cmd.env_remove("RUSTFLAGS").env_remove("CARGO_BUILD_TARGET");
    if !cmd.status().with_context(|| format!("running cargo build for {what}"))?.success() {
        bail!("building {what} failed");
    }
    Ok(())
}

/// Images for the system tests: from `MICROHV_IMAGE_DIR` when `cargo xtask
/// test` built them already, else built once per test process.
pub fn images_for_tests() -> Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES
        .get_or_init(|| {
            if let Ok(dir) = std::env::var("MICROHV_IMAGE_DIR") {
                let images = Images::in_dir(Path::new(&dir));
                assert!(images.microhv.exists(), "MICROHV_IMAGE_DIR={dir} has no microhv.elf");
                return images;
            }
            ensure_qemu().expect("QEMU is needed for the system tests");
            build_images(false).expect("building the images for the system tests")
        })
        .clone()
}

/// A QEMU run for the system tests: TCG with `-icount`, so the guest clock
/// counts instructions and results do not depend on how busy the host is.
pub fn test_run() -> QemuRun {
    let mut run = QemuRun::new(&images_for_tests());
    run.icount = true;
    run.timeout = Duration::from_secs(240);
    run
}

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    Tcg,
    Kvm,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Tcg => "TCG",
            Accel::Kvm => "KVM",
        }
    }
}

/// KVM only where the host has real hardware virtualization; under the PVM
/// flavour of KVM on our build machines microhv boots but its ring-1 guests
/// make no progress.
pub fn detect_accel() -> (Accel, &'static str) {
    let hw = Path::new("/sys/module/kvm_intel").exists() || Path::new("/sys/module/kvm_amd").exists();
    if hw && Path::new("/dev/kvm").exists() {
        (Accel::Kvm, "kvm_intel/kvm_amd loaded: hardware virtualization")
    } else if Path::new("/sys/module/kvm_pvm").exists() {
        (Accel::Tcg, "this host's KVM is the PVM flavour (no hardware virtualization): microhv's ring-1 guests make no progress under it")
    } else {
        (Accel::Tcg, "no hardware virtualization available")
    }
}

/// How a QEMU run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// microhv powered off with the success code.
    Success,
    /// microhv powered off reporting a failed check or a badly ended domain.
    Failure,
    /// microhv crashed (exception or panic) and said so.
    Crash,
    /// QEMU stopped without microhv's exit code (triple fault, reset).
    Reset,
    /// No exit within the time limit; QEMU was killed.
    Timeout,
    /// QEMU exited with some other status (e.g. it could not start).
    Other(i32),
}

impl Outcome {
    pub fn from_qemu_status(code: Option<i32>) -> Outcome {
        use shared_abi::exit::*;
        match code {
            Some(c) if c == qemu_status(SUCCESS) => Outcome::Success,
            Some(c) if c == qemu_status(FAILURE) => Outcome::Failure,
            Some(c) if c == qemu_status(CRASH) => Outcome::Crash,
            Some(0) => Outcome::Reset,
            Some(c) => Outcome::Other(c),
            None => Outcome::Other(-1),
        }
    }

    /// The exit code `cargo xtask qemu` returns.
    pub fn exit_code(self) -> i32 {
        match self {
            Outcome::Success => 0,
            Outcome::Failure => 1,
            Outcome::Crash => 2,
            Outcome::Reset => 3,
            Outcome::Timeout => 4,
            Outcome::Other(_) => 5,
        }
    }

    pub fn describe(self) -> String {
        match self {
            Outcome::Success => "success: microhv powered off cleanly".into(),
            Outcome::Failure => "failure: microhv reported a failed check or a badly ended domain".into(),
            Outcome::Crash => "crash: microhv hit an exception or panic (see the report above)".into(),
            Outcome::Reset => "reset: the machine stopped without microhv's exit code (triple fault?)".into(),
            Outcome::Timeout => "timeout: no exit within the time limit".into(),
            Outcome::Other(c) => format!("QEMU exited with unexpected status {c}"),
        }
    }
}

/// One QEMU boot of microhv.
#[derive(Debug, Clone)]
pub struct QemuRun {
    pub images: Images,
    pub cmdline: String,
    /// Module file names (relative to the image directory) with their arguments.
    pub modules: Vec<String>,
    pub accel: Accel,
    pub timeout: Duration,
    pub memory_mib: u32,
    /// Echo the serial console to our stdout as it arrives.
    pub echo: bool,
    /// `-icount shift=0,sleep=off`: virtual time counts instructions (deterministic).
    pub icount: bool,
    pub extra_args: Vec<String>,
    /// Bytes typed on the serial line (QEMU's stdin); `None`: no input.
    pub input: Option<Vec<u8>>,
    /// Let the user type on the serial line (stdin passed through).
    pub interactive: bool,
    /// A raw disk image attached as a virtio-blk PCI device (Dom0 drives it).
    pub disk: Option<PathBuf>,
}

/// Size of the disk image `ensure_disk` creates.
pub const DISK_MIB: u64 = 64;

/// Where `cargo xtask qemu` keeps its disk between runs.
pub fn default_disk() -> PathBuf {
    project_root().join("target").join("microhv-disk.img")
}

/// Creates the raw disk image `path` with `qemu-img` unless it exists
/// (`fresh`: delete it first). Returns whether it was created.
pub fn ensure_disk(path: &Path, fresh: bool) -> Result<bool> {
    if fresh && path.exists() {
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    if path.exists() {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(path)
        .arg(format!("{DISK_MIB}M"))
        .status()
        .context("running qemu-img (package qemu-utils)")?
        .success();
    if !ok {
        bail!("qemu-img could not create {}", path.display());
    }
    Ok(true)
}

/// Geometry of the Bochs disk image: Bochs wants a flat image that is a
/// whole number of cylinders, so the size is given as C/H/S explicitly.
pub const BOCHS_DISK_CYLINDERS: u64 = 64;
pub const BOCHS_DISK_HEADS: u64 = 16;
pub const BOCHS_DISK_SPT: u64 = 63;
/// 64512 sectors (31.5 MiB): room for the demo's virtual disks (sectors
/// 2048..18432 and 32768..49152).
pub const BOCHS_DISK_SECTORS: u64 = BOCHS_DISK_CYLINDERS * BOCHS_DISK_HEADS * BOCHS_DISK_SPT;
// The demo's virtual disks fit (domu2's ends at sector 49152).
const _: () = assert!(BOCHS_DISK_SECTORS == 64512 && BOCHS_DISK_SECTORS >= 49152);

/// Where `cargo xtask bochs` keeps its disk (ata0-slave) between runs.
pub fn default_bochs_disk() -> PathBuf {
    project_root().join("target").join("microhv-bochs-disk.img")
}

/// Creates the zeroed flat image `path` of [`BOCHS_DISK_SECTORS`] sectors
/// unless it exists (`fresh`: delete it first). Returns whether it was
/// created. An existing file of another size is an error: Bochs would not
/// take it with this geometry.
pub fn ensure_bochs_disk(path: &Path, fresh: bool) -> Result<bool> {
    if fresh && path.exists() {
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    let bytes = BOCHS_DISK_SECTORS * 512;
    if let Ok(m) = std::fs::metadata(path) {
        if m.len() != bytes {
            bail!("{} has {} bytes, not {bytes} ({BOCHS_DISK_SECTORS} sectors); start over with --fresh-disk", path.display(), m.len());
        }
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(bytes).with_context(|| format!("sizing {}", path.display()))?;
    Ok(true)
}

#[derive(Debug)]
pub struct RunResult {
    pub outcome: Outcome,
    pub serial: String,
    pub wall: Duration,
}

impl QemuRun {
    /// The default machine: microhv builds Dom0, whose toolstack creates the
    /// two DomUs from `domu1.toml` and `domu2.toml` (image `domu.elf`).
    pub fn new(images: &Images) -> QemuRun {
        QemuRun {
            images: images.clone(),
            cmdline: String::new(),
            modules: vec![
                "dom0.elf name=dom0 toolstack mem=32M".into(),
                "domu.elf".into(),
                "domu1.toml".into(),
                "domu2.toml".into(),
            ],
            accel: Accel::Tcg,
            timeout: Duration::from_secs(60),
            memory_mib: 256,
            echo: false,
            icount: false,
            extra_args: Vec::new(),
            input: None,
            interactive: false,
            disk: None,
        }
    }

    pub fn cmdline(mut self, c: &str) -> Self {
        self.cmdline = c.to_string();
        self
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.current_dir(&self.images.dir);
        cmd.args(["-machine", "pc", "-cpu", "qemu64", "-smp", "1"]);
        cmd.args(["-m", &format!("{}M", self.memory_mib)]);
        cmd.args(["-accel", if self.accel == Accel::Kvm { "kvm" } else { "tcg" }]);
        cmd.args(["-display", "none", "-nodefaults", "-no-reboot", "-serial", "stdio", "-monitor", "none"]);
        cmd.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
        if self.icount {
            cmd.args(["-icount", "shift=0,sleep=off"]);
        }
        cmd.args(["-kernel", "microhv.elf"]);
        if !self.modules.is_empty() {
            cmd.args(["-initrd", &self.modules.join(",")]);
        }
        cmd.args(["-append", &self.cmdline]);
        if let Some(disk) = &self.disk {
            let abs = std::fs::canonicalize(disk).unwrap_or_else(|_| disk.clone());
            cmd.args(["-drive", &format!("file={},format=raw,if=none,id=vd0,cache=writeback", abs.display())]);
            cmd.args(["-device", "virtio-blk-pci,drive=vd0"]);
        }
        cmd.args(&self.extra_args);
        cmd
    }

    /// Boots and waits for microhv to power off, or for the timeout.
    pub fn run(&self) -> Result<RunResult> {
        let mut cmd = self.command();
        let stdin = if self.interactive {
            Stdio::inherit()
        } else if self.input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        };
        cmd.stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
        if let (Some(bytes), Some(mut pipe)) = (self.input.clone(), child.stdin.take()) {
            // Kept open (in the thread) until QEMU exits, so QEMU never sees EOF.
            std::thread::spawn(move || {
                use std::io::Write;
                let _ = pipe.write_all(&bytes);
                let _ = pipe.flush();
                std::thread::sleep(Duration::from_secs(3600));
            });
        }
        let serial = Arc::new(Mutex::new(String::new()));
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let echo = self.echo;
        let sink = serial.clone();
        let reader = std::thread::spawn(move || {
            let mut line = Vec::new();
            while stdout.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                let text = String::from_utf8_lossy(&line).replace('\r', "");
                if echo {
                    print!("{text}");
                }
                sink.lock().unwrap().push_str(&text);
                line.clear();
            }
        });
        let mut stderr = child.stderr.take().expect("piped stderr");
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if start.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = reader.join();
        let qemu_stderr = err_reader.join().unwrap_or_default();
        let outcome = match status {
            None => Outcome::Timeout,
            Some(s) => Outcome::from_qemu_status(s.code()),
        };
        let mut serial = std::mem::take(&mut *serial.lock().unwrap());
        if !qemu_stderr.trim().is_empty() {
            serial.push_str("\n[qemu stderr]\n");
            serial.push_str(&qemu_stderr);
            if echo {
                eprint!("{qemu_stderr}");
            }
        }
        Ok(RunResult { outcome, serial, wall: start.elapsed() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bochs_disk_is_ata0_slave_with_explicit_geometry() {
        let images = Images::in_dir(Path::new("/tmp/x"));
        let mut run = BochsRun::new(&images);
        assert!(!run.bochsrc().contains("ata0-slave"), "no disk unless asked for");
        run.disk = Some(PathBuf::from("/tmp/x/disk.img"));
        let rc = run.bochsrc();
        assert!(rc.contains("ata0-master: type=cdrom, path=microhv.iso"), "{rc}");
        assert!(rc.contains("ata0-slave: type=disk, path=/tmp/x/disk.img, mode=flat, cylinders=64, heads=16, spt=63\n"), "{rc}");
    }

    #[test]
    fn bochs_disk_image_is_whole_cylinders_and_kept_unless_fresh() {
        let dir = std::env::temp_dir().join(format!("xtask-bochs-disk-{}", std::process::id()));
        let path = dir.join("d.img");
        assert!(ensure_bochs_disk(&path, false).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 64512 * 512);
        std::fs::write(&path, vec![1u8; 64512 * 512]).unwrap();
        assert!(!ensure_bochs_disk(&path, false).unwrap(), "kept");
        assert_eq!(std::fs::read(&path).unwrap()[0], 1);
        assert!(ensure_bochs_disk(&path, true).unwrap(), "fresh");
        assert_eq!(std::fs::read(&path).unwrap()[0], 0);
        std::fs::write(&path, b"short").unwrap();
        assert!(ensure_bochs_disk(&path, false).is_err(), "a wrong size is refused");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn qemu_status_maps_to_outcomes_and_exit_codes() {
        use shared_abi::exit::*;
        assert_eq!(Outcome::from_qemu_status(Some(qemu_status(SUCCESS))), Outcome::Success);
        assert_eq!(Outcome::from_qemu_status(Some(33)), Outcome::Success);
        assert_eq!(Outcome::from_qemu_status(Some(qemu_status(FAILURE))), Outcome::Failure);
        assert_eq!(Outcome::from_qemu_status(Some(qemu_status(CRASH))), Outcome::Crash);
        // QEMU exits 0 after a triple fault with -no-reboot: never a success.
        assert_eq!(Outcome::from_qemu_status(Some(0)), Outcome::Reset);
        assert_eq!(Outcome::from_qemu_status(None), Outcome::Other(-1));
        assert_eq!(Outcome::Success.exit_code(), 0);
        for o in [Outcome::Failure, Outcome::Crash, Outcome::Reset, Outcome::Timeout, Outcome::Other(9)] {
            assert_ne!(o.exit_code(), 0, "{o:?}");
        }
    }

    #[test]
    fn qemu_command_has_the_debug_exit_device_and_modules() {
        let images = Images::in_dir(Path::new("/tmp/x"));
        let cmd = QemuRun::new(&images).cmdline("loglevel=debug").command();
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let joined = args.join(" ");
        assert!(joined.contains("isa-debug-exit,iobase=0xf4,iosize=4"));
        assert!(joined.contains("-no-reboot"));
        assert!(joined.contains("-initrd dom0.elf name=dom0 toolstack mem=32M,domu.elf,domu1.toml,domu2.toml"));
        assert!(joined.contains("-append loglevel=debug"));
    }
}

/// The module line of the HVM demo DomU.
pub const HVM_DEMO_MODULE: &str = "domu-hvm.elf name=hvm1 boot mem=8M xapic";
/// The same image as a hybrid guest (VMCALL console, event channels).
pub const PVHVM_DEMO_MODULE: &str = "domu-hvm.elf name=hvm2 boot mem=8M pvhvm";

/// Debian packages for the Bochs path (VT-x lives only there on our machines).
pub const BOCHS_PACKAGES: &[(&str, &str)] = &[
    ("bochs", "bochs"),
    ("/usr/share/bochs/BIOS-bochs-latest", "bochsbios"),
    ("/usr/share/bochs/VGABIOS-lgpl-latest", "vgabios"),
    ("/usr/lib/x86_64-linux-gnu/bochs/plugins/libbx_term_gui.so", "bochs-term"),
    ("grub-mkrescue", "grub-common"),
    ("/usr/lib/grub/i386-pc/multiboot.mod", "grub-pc-bin"),
    ("xorriso", "xorriso"),
    ("mformat", "mtools"),
];

/// Installs what the Bochs path needs (as `ensure_qemu` does for QEMU).
pub fn ensure_bochs() -> Result<()> {
    // Commands are looked up on PATH; absolute paths are checked as files.
    ensure_packages(BOCHS_PACKAGES)
}

/// One Bochs boot of microhv from a GRUB ISO.
#[derive(Debug, Clone)]
pub struct BochsRun {
    pub images: Images,
    /// Module lines, as for QEMU (file name first).
    pub modules: Vec<String>,
    pub cmdline: String,
    pub timeout: Duration,
    pub echo: bool,
    /// Working directory (ISO, bochsrc, serial log) under the image directory.
    pub dir_name: String,
    /// A flat disk image of [`BOCHS_DISK_SECTORS`] sectors attached as
    /// ata0-slave (Dom0 drives it with PIO when there is no virtio-blk).
    pub disk: Option<PathBuf>,
}

impl BochsRun {
    /// The QEMU demo plus the HVM DomU (with a boot module) and its hybrid
    /// (PVHVM) twin (`domu-hvm.elf`, built by microhv at boot: `boot` on
    /// their lines), next to Dom0 so they get domain ids 1 and 3.
    pub fn new(images: &Images) -> BochsRun {
        let mut modules = QemuRun::new(images).modules;
        modules.insert(1, HVM_DEMO_MODULE.into());
        // A multiboot module for hvm1 (any file will do: a configuration).
        modules.insert(2, "domu1.toml for=hvm1".into());
        modules.insert(3, PVHVM_DEMO_MODULE.into());
        // And one that Dom0's toolstack creates from a configuration.
        modules.push("domu-hvm.elf".into());
        modules.push("hvm3.toml".into());
        BochsRun {
            images: images.clone(),
            modules,
            cmdline: String::new(),
            timeout: Duration::from_secs(300),
            echo: false,
            dir_name: "bochs".into(),
            disk: None,
        }
    }

    /// The Bochs configuration (paths relative to the run's directory, but
    /// the disk's, which is absolute).
    pub fn bochsrc(&self) -> String {
        let mut rc = String::from(
            "megs: 256\n\
             cpu: model=corei7_skylake_x, count=1, ips=100000000, reset_on_triple_fault=0, ignore_bad_msrs=0\n\
             clock: sync=none\n\
             romimage: file=/usr/share/bochs/BIOS-bochs-latest\n\
             vgaromimage: file=/usr/share/bochs/VGABIOS-lgpl-latest\n\
             ata0-master: type=cdrom, path=microhv.iso, status=inserted\n",
        );
        if let Some(disk) = &self.disk {
            let abs = std::fs::canonicalize(disk).unwrap_or_else(|_| disk.clone());
            rc.push_str(&format!(
                "ata0-slave: type=disk, path={}, mode=flat, cylinders={BOCHS_DISK_CYLINDERS}, heads={BOCHS_DISK_HEADS}, spt={BOCHS_DISK_SPT}\n",
                abs.display()
            ));
        }
        rc.push_str(
            "boot: cdrom\n\
             com1: enabled=1, mode=file, dev=serial.out\n\
             display_library: term\n\
             port_e9_hack: enabled=1\n\
             log: bochs.log\n",
        );
        rc
    }

    /// Builds the ISO and boots it; the outcome comes from the serial output
    /// (Bochs exits with status 1 both on shutdown and on a panic).
    pub fn run(&self) -> Result<RunResult> {
        let dir = self.images.dir.join(&self.dir_name);
        let iso_root = dir.join("iso");
        let boot = iso_root.join("boot");
        std::fs::create_dir_all(boot.join("grub"))?;
        let mut cfg = String::from("set timeout=0\nset default=0\nmenuentry \"microhv\" {\n");
        cfg.push_str(&format!("  multiboot /boot/microhv.elf {}\n", self.cmdline));
        std::fs::copy(&self.images.microhv, boot.join("microhv.elf"))?;
        for m in &self.modules {
            let file = m.split_whitespace().next().unwrap_or_default();
            std::fs::copy(self.images.dir.join(file), boot.join(file)).with_context(|| format!("module {file}"))?;
            // GRUB passes only the arguments; repeat the file name so the
            // module line reads the same as under QEMU.
            cfg.push_str(&format!("  module /boot/{file} {m}\n"));
        }
        cfg.push_str("}\n");
        std::fs::write(boot.join("grub/grub.cfg"), cfg)?;
        let iso = dir.join("microhv.iso");
        let out = Command::new("grub-mkrescue").arg("-o").arg(&iso).arg(&iso_root).output().context("running grub-mkrescue")?;
        if !out.status.success() {
            bail!("grub-mkrescue failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let serial = dir.join("serial.out");
        let _ = std::fs::remove_file(&serial);
        std::fs::write(dir.join("bochsrc"), self.bochsrc())?;
        std::fs::write(dir.join("cmds"), "c\n")?;
        let start = Instant::now();
        // The term display ignores SIGTERM: `timeout -s KILL` stops it.
        let status = Command::new("timeout")
            .args(["-s", "KILL", &self.timeout.as_secs().to_string(), "bochs", "-q", "-f", "bochsrc", "-rc", "cmds"])
            .current_dir(&dir)
            .env("TERM", "dumb")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running bochs")?;
        let text = std::fs::read(&serial).map(|b| String::from_utf8_lossy(&b).replace('\r', "")).unwrap_or_default();
        if self.echo {
            print!("{text}");
        }
        let log = std::fs::read_to_string(dir.join("bochs.log")).unwrap_or_default();
        let panics: Vec<&str> =
            log.lines().filter(|l| l.contains(">>PANIC<<") && !l.contains("shutdown requested")).collect();
        // `timeout -s KILL` exits 137 when it had to kill Bochs.
        let outcome = if status.code() == Some(137) {
            Outcome::Timeout
        } else if !panics.is_empty() {
            Outcome::Other(1)
        } else if text.contains("microhv CRASH") {
            Outcome::Crash
        } else if text.lines().any(|l| l.starts_with("microhv: summary:") && l.ends_with("exit success"))
            || text.contains("self-check PASSED; no modules")
        {
            Outcome::Success
        } else if text.contains("microhv: summary:") || text.contains("FAILED") {
            Outcome::Failure
        } else {
            Outcome::Reset
        };
        let mut serial_text = text;
        if !panics.is_empty() {
            serial_text.push_str("\n[bochs panics]\n");
            serial_text.push_str(&panics.join("\n"));
        }
        Ok(RunResult { outcome, serial: serial_text, wall: start.elapsed() })
    }
}
