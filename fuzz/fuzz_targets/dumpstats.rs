//! Fuzz target: any bytes as a pg_dump stream, fed whole, byte by byte and in pieces of a
//! size taken from the input. None may panic, and the result must not depend on the pieces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgferry::archive::DumpStatsTap;

fn read_in_pieces(data: &[u8], piece: usize) -> String {
    let mut tap = DumpStatsTap::new();
    for chunk in data.chunks(piece.max(1)) {
        tap.feed(chunk);
    }
    format!("{:?}", tap.finish())
}

fuzz_target!(|data: &[u8]| {
    let whole = read_in_pieces(data, data.len());
    let piece = 1 + data.first().copied().unwrap_or(0) as usize % 97;
    assert_eq!(
        read_in_pieces(data, piece),
        whole,
        "pieces of {piece} bytes"
    );
    if data.len() <= 4096 {
        assert_eq!(read_in_pieces(data, 1), whole, "byte by byte");
    }
});
