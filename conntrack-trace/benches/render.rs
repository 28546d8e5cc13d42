//! Userspace cost per event: decode + explain + render, on events recorded from real kernels
//! in the VM suite (tests/fixtures/*.ctrec). Target: >= 1,000,000 events/s on one core.
//! `decode_only` is the part before any output (parse, reason, window math, hints, summary,
//! correlation), so the renderers' share is the difference.

use std::{fs, hint::black_box, io, path::Path};

use conntrack_trace::{
    events::Events,
    hints::{Hints, Node},
    output::{Loss, Output, json::Json, text::Text},
    owner::{Owner, OwnerCache, Process},
    record,
    reset::{self, Incident, Reset},
    summary::Summary,
    verdict::Record,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// The records of the fixture recordings whose name contains `filter`, with a clock.
fn fixtures(filter: &str) -> (conntrack_trace::verdict::Clock, Vec<Vec<u8>>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut all = Vec::new();
    let mut clock = None;
    for e in fs::read_dir(&dir).expect("tests/fixtures") {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".ctrec") && name.contains(filter) {
            let (c, recs) = record::read(fs::File::open(&path).unwrap()).unwrap();
            clock = Some(c);
            all.extend(recs);
        }
    }
    assert!(!all.is_empty(), "no recorded events in {}", dir.display());
    (clock.unwrap(), all)
}

/// Two mixes: everything recorded (window events, the client's RSTs, incidents), and the
/// out-of-window events alone, which is what a flood of INVALID packets looks like.
fn bench(c: &mut Criterion) {
    for (group, filter) in [("all_fixtures", ""), ("window_events", "tcp-window")] {
        per_event(c, group, filter);
    }
}

/// The buffer the tracer writes text to stdout through (main.rs), emptied into nothing: the
/// copy into it is part of the cost, the write(2) is not.
fn stdout_like() -> io::BufWriter<io::Sink> {
    io::BufWriter::with_capacity(1 << 16, io::sink())
}

fn per_event(c: &mut Criterion, group: &str, filter: &str) {
    let (clock, records) = fixtures(filter);
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(records.len() as u64));
    g.bench_function("decode_explain_json", |b| {
        let mut events = Events::new(clock, Hints::new(Node::default()), true, None);
        // Json buffers itself: stdout is given to it unbuffered (main.rs).
        let mut out = Json::new(io::sink());
        b.iter(|| {
            for r in &records {
                black_box(events.handle(black_box(r), &mut out)).ok();
            }
        })
    });
    // Every namespace with an owner of the common size (a pod's: two processes, a name, a
    // kubelet cgroup): what each event then copies.
    let owners = owners_of(&records);
    g.bench_function("decode_explain_json_owner", |b| {
        let mut events = Events::new(clock, Hints::new(Node::default()), true, None);
        events.owners = Some(owners.clone());
        let mut out = Json::new(io::sink());
        b.iter(|| {
            for r in &records {
                black_box(events.handle(black_box(r), &mut out)).ok();
            }
        })
    });
    g.bench_function("decode_explain_text_owner", |b| {
        let mut events = Events::new(clock, Hints::new(Node::default()), true, None);
        events.owners = Some(owners.clone());
        let mut out = Text::new(stdout_like(), false);
        b.iter(|| {
            for r in &records {
                black_box(events.handle(black_box(r), &mut out)).ok();
            }
        })
    });
    g.bench_function("decode_only", |b| {
        let mut events = Events::new(clock, Hints::new(Node::default()), true, None);
        b.iter(|| {
            for r in &records {
                black_box(events.handle(black_box(r), &mut Discard)).ok();
            }
        })
    });
    g.bench_function("decode_explain_text", |b| {
        let mut events = Events::new(clock, Hints::new(Node::default()), true, None);
        let mut out = Text::new(stdout_like(), false);
        b.iter(|| {
            for r in &records {
                black_box(events.handle(black_box(r), &mut out)).ok();
            }
        })
    });
    g.finish();
}

/// An owner for every namespace the records name.
fn owners_of(records: &[Vec<u8>]) -> OwnerCache {
    use conntrack_trace_common::kind;
    let mut inodes: Vec<u32> = records
        .iter()
        .filter_map(|r| {
            match r
                .get(..4)
                .map(|k| u32::from_ne_bytes(k.try_into().unwrap()))
            {
                Some(kind::PACKET) => conntrack_trace::verdict::parse(r).ok().map(|e| e.netns),
                Some(kind::RESET) => reset::parse(r).ok().map(|e| e.netns),
                _ => None,
            }
        })
        .collect();
    inodes.sort_unstable();
    inodes.dedup();
    inodes
        .into_iter()
        .map(|ns| {
            let processes = vec![
                Process { pid: 4211, comm: "pause".into() },
                Process { pid: 4302, comm: "nginx".into() },
            ];
            let cgroup = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6f1c2a3b_4d5e_4f60_8a7b_9c0d1e2f3a4b.slice";
            (ns, Owner::new(processes, 2, Some(format!("cni-{ns}")), Some(cgroup.into())))
        })
        .collect()
}

/// An output that renders nothing.
struct Discard;

impl Output for Discard {
    fn event(&mut self, r: &Record) -> io::Result<()> {
        black_box(r);
        Ok(())
    }
    fn lost(&mut self, _: u64, _: Loss) -> io::Result<()> {
        Ok(())
    }
    fn reset(&mut self, r: &Reset) -> io::Result<()> {
        black_box(r);
        Ok(())
    }
    fn incident(&mut self, i: &Incident) -> io::Result<()> {
        black_box(i);
        Ok(())
    }
    fn summary(&mut self, _: &Summary) -> io::Result<()> {
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
