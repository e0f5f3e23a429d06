//! Lane copies from the peer: `copies::decode` on arbitrary datagrams, and `unseen` on
//! arbitrary offsets. A decoded copy reads back as its header and data, on a copied lane;
//! what `unseen` takes continues exactly what was handed on.
//!
//! Input: the datagram; its first 20 bytes also give `delivered`, `offset` and `len`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trust_dist_proto::copies::{decode, header, unseen, HEADER_BYTES};
use trust_dist_proto::lanes::LANES;

fuzz_target!(|data: &[u8]| {
    if let Ok(copy) = decode(data) {
        assert!((1..LANES).contains(&copy.lane));
        assert!(copy.offset >= 1);
        assert_eq!(header(copy.lane, copy.offset)[..], data[..HEADER_BYTES]);
        assert_eq!(copy.data, &data[HEADER_BYTES..]);
        assert!(!copy.data.is_empty());
    }
    if data.len() >= 20 {
        let word = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().unwrap());
        let (delivered, offset) = (word(0), word(8));
        let len = u32::from_le_bytes(data[16..20].try_into().unwrap()) as usize;
        if let Some(from) = unseen(delivered, offset, len) {
            assert!(from < len);
            assert_eq!(offset + from as u64, delivered);
        }
    }
});
