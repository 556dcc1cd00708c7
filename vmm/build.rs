//! Builds the built-in guest programs (`guest/`) into a flat binary, `$OUT_DIR/guest.bin`, which
//! the agent embeds (see `src/guest/image.rs` and docs/guest-abi.md).
//!
//! The guest is freestanding x86-64 code compiled with the system C compiler and linked at
//! `0x10_0000` by `guest/guest.ld`, then flattened with `objcopy -O binary`. Needs gcc (or a
//! compatible compiler in `CC`) and binutils (`objcopy`, or `OBJCOPY`); only std is used here.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest program lives at `0x10_0000`, below the generation table at `0x20_0000`: < 1 MiB.
const MAX_IMAGE_BYTES: u64 = 1 << 20;

/// Compiler flags. The guest runs at CPL3 with no SSE enabled (CR4 lacks OSFXSR), no libc,
/// no interrupts or exceptions, and is loaded as a flat image, hence:
/// - general registers only (SSE would #UD), no red zone, no stack protector or CET
///   instrumentation (`endbr64`), no unwind tables (they would only bloat the image);
/// - static, non-PIC, no build id so the bytes depend only on the sources.
const CFLAGS: &[&str] = &[
    "-O2",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-no-pie",
    "-static",
    "-nostdlib",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fcf-protection=none",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wl,--build-id=none",
    "-Wl,-T,guest.ld",
];

const SOURCES: &[&str] = &["start.S", "guest.c"];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guest_dir = manifest_dir.join("guest");

    println!("cargo:rerun-if-changed=build.rs");
    for file in ["start.S", "guest.c", "guest.ld"] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(file).display());
    }
    println!("cargo:rerun-if-env-changed=CC");
    println!("cargo:rerun-if-env-changed=OBJCOPY");

    let elf = out_dir.join("guest.elf");
    let bin = out_dir.join("guest.bin");

    // Compile and link in one go, from inside guest/ so the sources and the linker script are
    // named relatively; the prefix map keeps any embedded path independent of the checkout.
    let (cc, cc_args) = tool_from_env("CC", "gcc");
    let mut compile = Command::new(&cc);
    compile
        .current_dir(&guest_dir)
        .args(&cc_args)
        .args(CFLAGS)
        .arg(format!("-ffile-prefix-map={}=guest", guest_dir.display()))
        .arg("-o")
        .arg(&elf)
        .args(SOURCES);
    run(compile, &cc);

    let (objcopy, objcopy_args) = tool_from_env("OBJCOPY", "objcopy");
    let mut flatten = Command::new(&objcopy);
    flatten
        .args(&objcopy_args)
        .args(["-O", "binary"])
        .arg(&elf)
        .arg(&bin);
    run(flatten, &objcopy);

    check_image(&bin);
}

/// A tool named by an environment variable (possibly with arguments, like `CC="gcc -m64"`),
/// or the default.
fn tool_from_env(var: &str, default: &str) -> (String, Vec<String>) {
    let value = env::var(var).ok().filter(|v| !v.trim().is_empty());
    let value = value.as_deref().unwrap_or(default);
    let mut words = value.split_whitespace().map(str::to_owned);
    let program = words.next().unwrap_or_else(|| default.to_owned());
    (program, words.collect())
}

/// Runs a build step, failing the build with the tool's output if it does not succeed.
fn run(mut command: Command, tool: &str) {
    let output = match command.output() {
        Ok(output) => output,
        Err(err) => panic!(
            "building the built-in guest needs gcc and binutils (objcopy): \
             cannot run `{tool}`: {err}\n(set CC / OBJCOPY to use other tools)\ncommand: {command:?}"
        ),
    };
    if !output.status.success() {
        panic!(
            "building the built-in guest failed ({}); it needs gcc and binutils (objcopy)\n\
             command: {command:?}\n--- stderr ---\n{}\n--- stdout ---\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout),
        );
    }
    // Warnings are errors (-Werror), but the linker may still print notes worth seeing.
    if !output.stderr.is_empty() {
        for line in String::from_utf8_lossy(&output.stderr).lines() {
            println!("cargo:warning={tool}: {line}");
        }
    }
}

/// The flat image must exist, be non-empty and fit its 1 MiB slot (`0x10_0000..0x20_0000`).
fn check_image(bin: &Path) {
    let len = match std::fs::metadata(bin) {
        Ok(meta) => meta.len(),
        Err(err) => panic!("built-in guest image {} missing: {err}", bin.display()),
    };
    assert!(len > 0, "built-in guest image {} is empty", bin.display());
    assert!(
        len < MAX_IMAGE_BYTES,
        "built-in guest image is {len} bytes, it must be smaller than 1 MiB"
    );
}
