//! Any bytes as a recording, through `replay`'s path: the streaming reader, then every record
//! it yields through the decoders, the correlator and both renderers.
#![no_main]

use conntrack_trace::{
    events::Events,
    hints::{Hints, Node},
    output::{Output, json::Json, text::Text},
    record::Reader,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut reader) = Reader::new(data) else {
        return;
    };
    let mut events = Events::new(*reader.clock(), Hints::new(Node::default()), true, None);
    let mut json = Json::new(std::io::sink());
    let mut text = Text::new(std::io::sink(), false);
    let mut rec = Vec::new();
    let mut read = 0usize;
    while let Ok(true) = reader.next_into(&mut rec) {
        read += 4 + rec.len();
        assert!(read <= data.len(), "the reader yielded more than it was given");
        events.handle(&rec, &mut json).unwrap();
        events.handle(&rec, &mut text).unwrap();
    }
    json.summary(&events.summary).unwrap();
    text.summary(&events.summary).unwrap();
});
