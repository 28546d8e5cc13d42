//! The real binary on the real host kernel: `check` loads every program through the verifier,
//! and every error a user can meet gives a sentence and its documented exit status (1 for an
//! error, 2 for a usage error), never a panic. What the host lacks or has (BTF,
//! nf_conntrack, the counters) is changed for one run in a private mount namespace, so each
//! error is produced for real, not assumed. Like `cargo xtask test`, these run as root.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_conntrack-trace");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("spawn")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// An error: exit status 1, the one-line `conntrack-trace: ` message on stderr, no panic.
fn assert_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{}", text(o));
    assert!(err.starts_with("conntrack-trace: "), "{err}");
    assert!(!text(o).contains("panicked"), "{}", text(o));
    for n in needles {
        assert!(err.contains(n), "{n:?} missing from: {err}");
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The binary with `prepare` (sh commands, as root) run first in a private mount namespace:
/// what it mounts there is what the binary sees, and nothing outside changes.
fn in_private_mounts(prepare: &str, args: &[&str]) -> Output {
    assert!(
        is_root(),
        "the CLI tests change mounts in a private namespace and load BPF: run them as root"
    );
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-ec"])
        .arg(format!("{prepare}\nexec \"$0\" \"$@\""))
        .arg(BIN)
        .args(args)
        .output()
        .expect("unshare (util-linux)")
}

/// A /proc whose `net/stat/nf_conntrack` is `stat` (absent when `None`); /proc/sys stays
/// the kernel's.
fn with_conntrack_stat(stat: Option<&Path>) -> String {
    let mut s = String::from(
        "real=$(mktemp -d); mount --rbind /proc \"$real\"; mount -t tmpfs none /proc; \
         mkdir -p /proc/net/stat /proc/sys; mount --rbind \"$real/sys\" /proc/sys",
    );
    if let Some(p) = stat {
        s += &format!("; cp {} /proc/net/stat/nf_conntrack", p.display());
    }
    s
}

/// The binary as an unprivileged user (nobody, no capabilities) when the tests run as root.
fn unprivileged(args: &[&str]) -> Output {
    let mut cmd = if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(BIN);
        c
    } else {
        Command::new(BIN)
    };
    cmd.args(args).output().expect("setpriv (util-linux)")
}

/// A path in this test process's own directory under the system's temp dir (each test uses
/// its own names; the tests run in parallel).
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("conntrack-trace-cli-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = fs::remove_file(&path);
    path
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Byte offsets where each record of a recording starts, read with the format's own
/// definition (24-byte header, then `u32 LE length + record`), and the file's length.
fn record_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut at = 24;
    let mut starts = Vec::new();
    while at < bytes.len() {
        starts.push(at);
        let n = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        at += 4 + n;
    }
    assert_eq!(at, bytes.len(), "fixture ends after a whole record");
    starts
}

fn json_lines(o: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
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
    if !kprobes_available() {
        assert!(
            out.contains("Attaching is impossible on this kernel"),
            "{out}"
        );
    }
}

fn kprobes_available() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe/type").exists()
        || Path::new("/sys/kernel/tracing/kprobe_events").exists()
}

/// The tracer itself, for one second: where kprobes attach it runs and ends with its summary;
/// where they do not, it says so and points at the VM demo.
#[test]
fn tracing_runs_or_says_why_it_cannot() {
    let o = run(&["--json", "--duration", "1s"]);
    if kprobes_available() {
        assert!(o.status.success(), "{}", text(&o));
        let last = json_lines(&o).pop().expect("a summary line");
        assert_eq!(last["event"], "summary", "{last}");
        assert!(last["seconds"].as_f64().unwrap() >= 1.0, "{last}");
    } else {
        assert_error(&o, &["cannot attach kprobes", "xtask demo"]);
    }
}

#[test]
fn without_root_tracing_and_check_say_what_they_need_and_stats_works() {
    for args in [&["--duration", "1s"][..], &["check"]] {
        let o = unprivileged(args);
        assert_error(&o, &["needs root, or the CAP_BPF and CAP_PERFMON", "sudo"]);
    }
    let o = unprivileged(&["stats", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(json_lines(&o)[0]["counters"].is_object());
}

#[test]
fn missing_btf_is_explained() {
    let o = in_private_mounts("mount -t tmpfs none /sys/kernel/btf", &["check"]);
    assert_error(
        &o,
        &[
            "/sys/kernel/btf/vmlinux does not exist",
            "CONFIG_DEBUG_INFO_BTF",
        ],
    );
}

#[test]
fn nf_conntrack_not_loaded_is_explained() {
    // The kernel as it is without nf_conntrack: no nf_conntrack_in among its symbols, no
    // counter file.
    let kallsyms = scratch("kallsyms");
    let all = fs::read_to_string("/proc/kallsyms").unwrap();
    let mut f = fs::File::create(&kallsyms).unwrap();
    for l in all.lines() {
        let name = l.split_whitespace().nth(2).unwrap_or("");
        if !name.starts_with("nf_conntrack_in") && !l.ends_with("[nf_conntrack]") {
            writeln!(f, "{l}").unwrap();
        }
    }
    drop(f);
    let o = in_private_mounts(
        &format!("mount --bind {} /proc/kallsyms", kallsyms.display()),
        &["check"],
    );
    assert_error(&o, &["nf_conntrack", "nothing to trace"]);

    let o = in_private_mounts(&with_conntrack_stat(None), &["stats"]);
    assert_error(
        &o,
        &["/proc/net/stat/nf_conntrack does not exist: nf_conntrack is not loaded"],
    );
}

#[test]
fn stats_sums_the_kernels_per_cpu_counters() {
    let stat = scratch("nf_conntrack");
    fs::write(
        &stat,
        "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart\n\
         00000003  00000000 00000010 00000000 0000000a 00000001 00000000 00000000 00000000 00000002 00000000 00000000 00000000  00000000 00000000 00000000 00000000\n\
         00000003  00000000 00000020 00000000 000000ff 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000007  00000000 00000000 00000000 00000000\n",
    )
    .unwrap();
    let o = in_private_mounts(&with_conntrack_stat(Some(&stat)), &["stats", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v = &json_lines(&o)[0];
    let c = &v["counters"];
    assert_eq!(c["invalid"], 10 + 255, "{v}");
    assert_eq!(c["found"], 0x30, "{v}");
    assert_eq!(c["insert_failed"], 2, "{v}");
    assert_eq!(c["icmp_error"], 7, "{v}");
    assert_eq!(c["ignore"], 1, "{v}");
    let per_cpu = v["per_cpu"].as_array().unwrap();
    assert_eq!(per_cpu.len(), 2, "{v}");
    assert_eq!(per_cpu[1]["invalid"], 255, "{v}");
    assert!(v["sysctls"]["nf_conntrack_tcp_be_liberal"].is_u64(), "{v}");

    let o = in_private_mounts(&with_conntrack_stat(Some(&stat)), &["stats"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("sum of 2 CPUs"), "{out}");
    let invalid = out
        .lines()
        .find(|l| l.trim_start().starts_with("invalid "))
        .expect("an invalid line");
    assert_eq!(invalid.split_whitespace().nth(1), Some("265"), "{out}");
}

/// `stats --watch`: after the first snapshot, each one is the change over its interval; a
/// closed stdout ends it with status 0.
#[test]
fn stats_watch_prints_what_changed_per_interval() {
    let header = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart\n";
    let row = |invalid: u32| {
        format!(
            "00000001  00000000 00000000 00000000 {invalid:08x} 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000  00000000 00000000 00000000 00000000\n"
        )
    };
    let (before, after) = (scratch("stat-before"), scratch("stat-after"));
    fs::write(&before, format!("{header}{}", row(100))).unwrap();
    fs::write(&after, format!("{header}{}", row(142))).unwrap();
    assert!(is_root(), "run as root (private mount namespace)");
    // The counters move 0.4 s in, between the first snapshot and the second (at 1 s).
    let prepare = format!(
        "{}; (sleep 0.4; cp {} /proc/net/stat/nf_conntrack) &",
        with_conntrack_stat(Some(&before)),
        after.display()
    );
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-ec"])
        .arg(format!("{prepare}\nexec \"$0\" \"$@\""))
        .arg(BIN)
        .args(["stats", "--json", "--watch", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let second: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    drop(lines);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(first["counters"]["invalid"], 100, "{first}");
    assert!(first["interval_s"].is_null(), "{first}");
    assert_eq!(second["counters"]["invalid"], 42, "{second}");
    let interval = second["interval_s"].as_f64().unwrap();
    assert!((0.9..3.0).contains(&interval), "{second}");
}

/// `stats` on this host's real counters: one row per CPU the kernel's file has.
#[test]
fn stats_reads_this_kernel() {
    let rows = fs::read_to_string("/proc/net/stat/nf_conntrack")
        .expect("nf_conntrack is loaded on the test host")
        .lines()
        .count()
        - 1;
    let o = run(&["stats", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v = &json_lines(&o)[0];
    assert_eq!(v["per_cpu"].as_array().unwrap().len(), rows, "{v}");
    assert!(v["table"]["max"].as_u64().unwrap() > 0, "{v}");
}

/// `schema` prints the JSON Schema of `--json`: every line of every recorded fixture's
/// replay, resets included, follows it, and it rejects a line with a misspelt key.
#[test]
fn replayed_lines_follow_the_printed_schema() {
    let o = run(&["schema"]);
    assert!(o.status.success(), "{}", text(&o));
    let schema: Value = serde_json::from_slice(&o.stdout).expect("the schema is JSON");
    let mut kinds = std::collections::BTreeSet::new();
    for e in fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")).unwrap() {
        let f = e.unwrap().path();
        let o = run(&["replay", f.to_str().unwrap(), "--json", "--resets"]);
        assert!(o.status.success(), "{}", text(&o));
        for line in json_lines(&o) {
            if let Err(why) = conntrack_trace::schema::validate(&schema, &line) {
                panic!("{}: {why}: {line}", f.display());
            }
            assert_eq!(line["schema_version"], conntrack_trace::schema::VERSION);
            kinds.insert(line["event"].as_str().unwrap().to_string());
        }
    }
    for kind in ["invalid", "incident", "summary"] {
        assert!(kinds.contains(kind), "no {kind} line among {kinds:?}");
    }
    let mut bad = json_lines(&run(&[
        "replay",
        fixture("6.12-tcp-window.ctrec").to_str().unwrap(),
        "--json",
    ]))
    .remove(0);
    let code = bad.as_object_mut().unwrap().remove("reason_code").unwrap();
    bad["reason_cod"] = code;
    assert!(
        conntrack_trace::schema::validate(&schema, &bad).is_err(),
        "{bad}"
    );
}

/// The summary counts what was printed: one INVALID/IGNORED line per event, per reason.
#[test]
fn replay_prints_every_event_and_a_summary_that_counts_them() {
    let f = fixture("6.12-kube-proxy-incident.ctrec");
    let o = run(&["replay", f.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let lines = json_lines(&o);
    let (summary, events) = lines.split_last().unwrap();
    assert_eq!(summary["event"], "summary");
    let count = |kind: &str| events.iter().filter(|e| e["event"] == kind).count() as u64;
    assert_eq!(summary["invalid"], count("invalid"), "{summary}");
    assert_eq!(summary["ignored"], count("ignored"), "{summary}");
    assert_eq!(summary["incidents"], count("incident"), "{summary}");
    assert!(count("invalid") >= 1 && count("incident") >= 1, "{lines:?}");
    let by_code = summary["counts"].as_object().unwrap();
    for (code, n) in by_code {
        let printed = events.iter().filter(|e| e["reason_code"] == *code).count() as u64;
        assert_eq!(n.as_u64(), Some(printed), "{code}: {summary}");
    }

    let o = run(&["replay", f.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    // An event line is its time, then its verdict.
    let verdicts = |v: &str| {
        out.lines()
            .filter(|l| l.split_whitespace().nth(1) == Some(v))
            .count()
    };
    let (inv, ign) = (verdicts("INVALID"), verdicts("IGNORED"));
    assert!(inv >= 1, "{out}");
    assert!(
        out.contains(&format!(
            "events: {inv} invalid, {ign} ignored, 0 dropped; 0 lost"
        )),
        "{out}"
    );

    let o = run(&["replay", f.to_str().unwrap(), "--json", "--count", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 2, "one event and the summary: {lines:?}");
}

/// A tracer killed mid-write: every complete record is printed as it would be from the
/// recording cut at its last whole record, then the summary; the cut is reported with its
/// byte offset and the exit status is 1.
#[test]
fn replay_of_a_cut_recording_prints_what_is_complete_and_reports_the_cut() {
    let full = fs::read(fixture("6.12-kube-proxy-incident.ctrec")).unwrap();
    let last = *record_offsets(&full).last().unwrap();
    let whole = scratch("whole.ctrec");
    fs::write(&whole, &full[..last]).unwrap();
    let expected = run(&["replay", whole.to_str().unwrap(), "--json"]);
    assert!(expected.status.success(), "{}", text(&expected));
    let cut_file = scratch("cut.ctrec");
    for cut in [last + 1, last + 4, last + 5, full.len() - 1] {
        fs::write(&cut_file, &full[..cut]).unwrap();
        let o = run(&["replay", cut_file.to_str().unwrap(), "--json"]);
        assert_eq!(o.status.code(), Some(1), "cut at {cut}: {}", text(&o));
        assert_eq!(
            json_lines(&o),
            json_lines(&expected),
            "cut at {cut}: the complete records and the summary"
        );
        let err = stderr(&o);
        assert!(
            err.contains(&format!("cut off at byte {last}")) && err.contains("warning"),
            "cut at {cut}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[test]
fn unreadable_or_corrupt_recordings_are_refused() {
    let o = run(&["replay", "/nonexistent/recording.ctrec"]);
    assert_error(
        &o,
        &["opening /nonexistent/recording.ctrec", "No such file"],
    );

    let dir = scratch("a-directory");
    fs::create_dir_all(&dir).unwrap();
    assert_error(
        &run(&["replay", dir.to_str().unwrap()]),
        &["reading", "directory"],
    );

    let good = fs::read(fixture("6.12-tcp-window.ctrec")).unwrap();
    let secret = scratch("secret.ctrec");
    fs::write(&secret, &good).unwrap();
    fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    fs::set_permissions(
        secret.parent().unwrap(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let o = unprivileged(&["replay", secret.to_str().unwrap()]);
    assert_error(&o, &["opening", "Permission denied"]);

    let corrupt = |name: &str, bytes: &[u8], needles: &[&str]| {
        let p = scratch(name);
        fs::write(&p, bytes).unwrap();
        let o = run(&["replay", p.to_str().unwrap()]);
        assert_error(&o, needles);
    };
    corrupt(
        "empty",
        b"",
        &["not a conntrack-trace recording (too short)"],
    );
    corrupt(
        "garbage",
        b"GIF89a this is a picture, not a recording",
        &["not a conntrack-trace recording (bad magic)"],
    );
    let mut other_abi = good.clone();
    other_abi[8] ^= 0x01;
    corrupt(
        "other-abi",
        &other_abi,
        &["recorded with another event ABI"],
    );
    let mut huge = good.clone();
    let first = record_offsets(&good)[1];
    huge[first..first + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    corrupt(
        "huge-length",
        &huge,
        &[&format!(
            "corrupt recording: a {}-byte record at byte {first}",
            u32::MAX
        )],
    );
}

/// Records the decoders cannot use (a kind this build does not know, a packet event cut
/// short) are each named in a warning and skipped; the records around them are printed.
#[test]
fn undecodable_records_are_skipped_with_a_warning() {
    let good = fs::read(fixture("6.12-tcp-window.ctrec")).unwrap();
    let starts = record_offsets(&good);
    let mut bytes = good[..starts[1]].to_vec();
    for rec in [&99u32.to_ne_bytes()[..], &[1, 0, 0, 0, 1, 2, 3]] {
        bytes.extend_from_slice(&(rec.len() as u32).to_le_bytes());
        bytes.extend_from_slice(rec);
    }
    bytes.extend_from_slice(&good[starts[1]..]);
    let p = scratch("undecodable.ctrec");
    fs::write(&p, &bytes).unwrap();
    let o = run(&["replay", p.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let expected = run(&[
        "replay",
        fixture("6.12-tcp-window.ctrec").to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(json_lines(&o), json_lines(&expected));
    let err = stderr(&o);
    assert!(err.contains("unknown event kind Some(99)"), "{err}");
    assert!(err.contains("short event: 7 bytes"), "{err}");
}

#[test]
fn an_unwritable_pcap_file_is_named() {
    let o = run(&["--pcap", "/nonexistent/out.pcapng", "--duration", "1s"]);
    assert_error(&o, &["creating /nonexistent/out.pcapng", "No such file"]);
}

/// Every usage error, whoever finds it (clap or a filter's own parser), exits with 2 and
/// clap's `error:` line, before anything is loaded.
#[test]
fn every_usage_error_exits_2() {
    for args in [
        &["--port", "0"][..],
        &["--host", "not-an-ip"],
        &["--src", "10.0.0.0/40"],
        &["--dst", "fd00::/129"],
        &["--proto", "tcpp"],
        &["--proto", "0"],
        &["--ring-size", "1000"],
        &["--duration", "soon"],
        &["--snaplen", "5"],
        &["--netns", "0"],
        &["--verdict-probe", "magic"],
        &["--exact", "--cold"],
        &["--no-such-flag"],
        &["replay"],
        &["stats", "--watch", "0"],
        &["no-such-command"],
    ] {
        let o = run(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(err.starts_with("error:"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // The filter's own words reach the user.
    let err = stderr(&run(&["--proto", "tcpp"]));
    assert!(err.contains("unknown protocol \"tcpp\""), "{err}");
}

/// `| head`: a closed stdout ends the replay quietly with status 0.
#[test]
fn closed_stdout_ends_quietly() {
    let f = fixture("6.12-kube-proxy-incident.ctrec");
    let mut child = Command::new(BIN)
        .args(["replay", f.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(o.stderr.is_empty(), "{}", text(&o));
}
