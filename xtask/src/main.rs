//! `cargo xtask <command>`: the one entry point for people using microhv.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use std::process::Command;
use std::time::Duration;
use xtask::{abidoc, build_images, default_disk, detect_accel, ensure_disk, ensure_qemu, project_root, Accel, QemuRun, DISK_MIB};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, boot and test microhv")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build microhv, dom0 and domu-kernel for x86_64-unknown-none.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build and boot microhv with Dom0 and two DomUs in QEMU.
    Qemu {
        #[arg(long)]
        release: bool,
        /// Force an accelerator (default: KVM only with hardware virtualization, else TCG).
        #[arg(long, value_enum)]
        accel: Option<Accel>,
        /// Extra hypervisor command line, e.g. "loglevel=debug".
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Seconds before QEMU is stopped and the run counts as failed.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Deterministic virtual time: QEMU's clock counts instructions.
        #[arg(long)]
        icount: bool,
        /// Start over with a new, zeroed disk image (target/microhv-disk.img).
        #[arg(long)]
        fresh_disk: bool,
        /// Type on the serial line: Dom0 takes commands (help, list, quit) and
        /// Ctrl-] switches the input to a DomU; Dom0 stays up until `quit`.
        #[arg(long)]
        interactive: bool,
    },
    /// Build a GRUB ISO and boot microhv + Dom0 + the DomUs in Bochs.
    Bochs {
        #[arg(long)]
        release: bool,
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Start over with a new, zeroed disk image (target/microhv-bochs-disk.img, ata0-slave).
        #[arg(long)]
        fresh_disk: bool,
    },
    /// Run every test: host unit tests and the QEMU system tests.
    Test,
    /// Benchmarks: exact instruction and event counts per operation, with
    /// results.json, report.md and chart.svg under target/bench/<time>/.
    Bench {
        /// Fewer samples per benchmark (200 instead of 1000).
        #[arg(long)]
        quick: bool,
        /// Only the Bochs run (PV, HVM and PVHVM side by side).
        #[arg(long)]
        bochs_only: bool,
        /// Force the accelerator of the QEMU (PV) part: `kvm` measures in
        /// real time, `tcg` counts instructions with -icount (default: KVM
        /// only with hardware virtualization, else TCG).
        #[arg(long, value_enum)]
        accel: Option<Accel>,
    },
    /// Generate docs/abi.md from shared-abi.
    DocAbi {
        /// Only check that docs/abi.md is up to date; exit non-zero if not.
        #[arg(long)]
        check: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Cmd::Build { release } => {
            let images = build_images(release)?;
            println!("xtask: images in {}", images.dir.display());
            Ok(0)
        }
        Cmd::Qemu { release, accel, cmdline, timeout, icount, interactive, fresh_disk } => {
            ensure_qemu()?;
            let images = build_images(release)?;
            let (accel, why) = match accel {
                Some(a) => (a, "forced with --accel"),
                None => detect_accel(),
            };
            println!("xtask: accelerator: {} ({why})", accel.name());
            let mut run = QemuRun::new(&images).cmdline(&cmdline);
            run.accel = accel;
            run.timeout = Duration::from_secs(timeout);
            run.echo = true;
            run.icount = icount;
            let disk = default_disk();
            if ensure_disk(&disk, fresh_disk)? {
                println!("xtask: created disk image {} ({DISK_MIB} MiB, zeroed)", disk.display());
            } else {
                println!("xtask: disk image {} (kept from earlier runs; --fresh-disk starts over)", disk.display());
            }
            run.disk = Some(disk);
            if interactive {
                run.interactive = true;
                run.timeout = Duration::from_secs(24 * 3600);
                run.modules[0].push_str(" interactive");
                println!("xtask: interactive: type `help` for Dom0's commands; Ctrl-] switches the input to a DomU");
            }
            let result = run.run()?;
            println!("xtask: {} ({:.1} s, accelerator {})", result.outcome.describe(), result.wall.as_secs_f64(), accel.name());
            Ok(result.outcome.exit_code())
        }
        Cmd::Bench { quick, bochs_only, accel } => {
            ensure_qemu()?;
            let images = build_images(true)?;
            // The same command on a machine with hardware virtualization
            // measures PV under KVM in real time (cycle-level figures).
            let (accel, why) = match accel {
                Some(a) => (a, "forced with --accel"),
                None => detect_accel(),
            };
            match accel {
                Accel::Kvm => println!("xtask: bench: PV flavour under QEMU with KVM ({why}): real-time figures"),
                _ => println!("xtask: bench: PV flavour under QEMU TCG with -icount ({why}): figures are instruction counts, exact and repeatable"),
            }
            println!("xtask: bench: running the benchmark guest ({} samples per benchmark)...", if quick { 200 } else { 1000 });
            let (mut report, _serial) = if bochs_only {
                (xtask::bench::empty_report(quick), String::new())
            } else {
                xtask::bench::run_pv_qemu(&images, quick, accel)?
            };
            for k in if bochs_only { vec![] } else if quick { vec![2, 64] } else { vec![2, 8, 32, 64] } {
                println!("xtask: bench: scheduler with {k} runnable domains...");
                let (benches, per_domain) = xtask::bench::run_switch_qemu(&images, k, quick, accel)?;
                report.benches.extend(benches);
                if k == 64 {
                    report.hv_bytes_per_domain = per_domain;
                }
            }
            xtask::ensure_bochs()?;
            println!("xtask: bench: PV, HVM and PVHVM side by side in Bochs (VT-x), one run...");
            report.benches.extend(xtask::bench::run_bochs(&images, quick)?);
            report.emulator = format!(
                "{} (PV), and Bochs 2.7 corei7_skylake_x with VT-x (PV, HVM, PVHVM in one run)",
                if accel == Accel::Kvm { "QEMU with KVM, real time" } else { "QEMU TCG with -icount shift=0" }
            );
            print!("{}", xtask::bench::table(&report));
            let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let dir = project_root().join("target").join("bench").join(xtask::bench::timestamp(unix));
            for f in xtask::bench::write_files(&dir, &report)? {
                println!("xtask: wrote {}", f.display());
            }
            Ok(0)
        }
        Cmd::DocAbi { check } => {
            if check {
                abidoc::check()?;
                println!("xtask: docs/abi.md is up to date");
            } else if abidoc::write()? {
                println!("xtask: wrote {}", abidoc::path().display());
            } else {
                println!("xtask: {} is already up to date", abidoc::path().display());
            }
            Ok(0)
        }
        Cmd::Bochs { release, timeout, fresh_disk } => {
            xtask::ensure_bochs()?;
            let images = build_images(release)?;
            println!("xtask: emulator: Bochs (corei7_skylake_x, VMX available), booting from a GRUB ISO");
            let mut run = xtask::BochsRun::new(&images);
            run.timeout = Duration::from_secs(timeout);
            run.echo = true;
            let disk = xtask::default_bochs_disk();
            let geometry = format!(
                "{} sectors, {}/{}/{} C/H/S",
                xtask::BOCHS_DISK_SECTORS,
                xtask::BOCHS_DISK_CYLINDERS,
                xtask::BOCHS_DISK_HEADS,
                xtask::BOCHS_DISK_SPT
            );
            if xtask::ensure_bochs_disk(&disk, fresh_disk)? {
                println!("xtask: created disk image {} ({geometry}, zeroed) as ata0-slave", disk.display());
            } else {
                println!("xtask: disk image {} ({geometry}) as ata0-slave (kept from earlier runs; --fresh-disk starts over)", disk.display());
            }
            run.disk = Some(disk);
            let result = run.run()?;
            println!("xtask: {} ({:.1} s, Bochs)", result.outcome.describe(), result.wall.as_secs_f64());
            Ok(result.outcome.exit_code())
        }
        Cmd::Test => {
            abidoc::check()?;
            ensure_qemu()?;
            xtask::ensure_bochs()?;
            let images = build_images(false)?;
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            println!("xtask: running host unit tests, QEMU system tests (TCG, -icount) and the Bochs boot test");
            let status = Command::new(cargo)
                .current_dir(project_root())
                .args([
                    "test",
                    "--workspace",
                    "--exclude",
                    "microhv",
                    "--exclude",
                    "dom0",
                    "--exclude",
                    "domu-kernel",
                    "--exclude",
                    "hostile-guest",
                ])
                .env("MICROHV_IMAGE_DIR", &images.dir)
                .status()?;
            if !status.success() {
                bail!("tests failed");
            }
            println!("xtask: all tests passed");
            Ok(0)
        }
    }
}
