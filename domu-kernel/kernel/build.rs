// The PV DomU links with microhv-guest's linker script (like every PV
// guest); the HVM flavour (feature `hvm`) with its own multiboot layout at
// 1 MiB. Host builds get no linker arguments.
fn main() {
    let hvm = std::env::var_os("CARGO_FEATURE_HVM").is_some();
    let script = if hvm {
        format!("{}/hvm.ld", std::env::var("CARGO_MANIFEST_DIR").unwrap())
    } else {
        match std::env::var("DEP_MICROHV_GUEST_LINKER_SCRIPT") {
            Ok(s) => s,
            Err(_) => return,
        }
    };
    println!("cargo:rerun-if-changed={script}");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo:rustc-link-arg-bins=-T{script}");
        println!("cargo:rustc-link-arg-bins=--no-pie");
    }
}
