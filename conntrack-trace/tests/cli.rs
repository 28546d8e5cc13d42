//! The real binary on the real host kernel: `check` loads every program through the verifier,
//! and the error paths a user hits give a sentence and a non-zero exit, never a panic.

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_conntrack-trace"))
        .args(args)
        .output()
        .expect("spawn")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn check_verifies_every_program_on_this_kernel() {
    let o = run(&["check"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("all programs passed the verifier"), "{out}");
    // Each kprobe program was really submitted and has an instruction count.
    for prog in [
        "nf_conntrack_in ",
        "nf_conntrack_in_ret",
        "nf_tcp_log_invalid_variadic",
        "nf_tcp_log_invalid_struct",
        "nf_ct_l4proto_log_invalid",
        "nf_l4proto_log_invalid",
    ] {
        let programs = out
            .split("programs (loaded")
            .nth(1)
            .expect("programs section");
        let line = programs
            .lines()
            .find(|l| l.trim_start().starts_with(prog))
            .unwrap_or_else(|| panic!("{prog} missing:\n{out}"));
        assert!(
            line.contains("verifier OK") && line.contains("instructions"),
            "{line}"
        );
    }
    // The plan names the real symbols on this kernel and says which verdict mode it uses.
    assert!(out.contains("-> nf_ct_l4proto_log_invalid"), "{out}");
    assert!(out.contains("default mode"), "{out}");
    if !std::path::Path::new("/sys/bus/event_source/devices/kprobe/type").exists()
        && !std::path::Path::new("/sys/kernel/tracing/kprobe_events").exists()
    {
        assert!(
            out.contains("Attaching is impossible on this kernel"),
            "{out}"
        );
    }
}

#[test]
fn tracing_without_kprobes_says_so() {
    if std::path::Path::new("/sys/bus/event_source/devices/kprobe/type").exists() {
        return; // A kernel that can attach: covered by the VM suite.
    }
    let o = run(&["--json", "--duration", "1s"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot attach kprobes") && err.contains("xtask demo"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_flags_are_rejected_cleanly() {
    for args in [
        &["--port", "0"][..],
        &["--host", "not-an-ip"],
        &["--proto", "tcpp"],
        &["--ring-size", "1000"],
        &["--duration", "soon"],
        &["--src", "10.0.0.0/40"],
    ] {
        let o = run(args);
        let out = text(&o);
        assert!(!o.status.success(), "{args:?} accepted: {out}");
        assert!(!out.contains("panicked"), "{args:?}: {out}");
        assert!(
            out.contains("error") || out.contains("conntrack-trace:"),
            "{args:?}: {out}"
        );
    }
}
