use conntrack_trace::{
    events::Events,
    hints::{Hints, Node},
    output::json::Json,
    record,
};
use std::{fs, io};
fn main() {
    let mut recs = Vec::new();
    let mut clock = None;
    for e in fs::read_dir("/work/main/conntrack-trace/tests/fixtures").unwrap() {
        let (c, r) = record::read(fs::File::open(e.unwrap().path()).unwrap()).unwrap();
        clock = Some(c);
        recs.extend(r);
    }
    let mut ev = Events::new(clock.unwrap(), Hints::new(Node::default()), true, None);
    let mut out = Json::new(io::sink());
    for _ in 0..2000 {
        for r in &recs {
            let _ = ev.handle(r, &mut out);
        }
    }
}
