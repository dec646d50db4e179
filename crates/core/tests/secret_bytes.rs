//! `SecretBytes` leaves no copy of its bytes in freed memory. After a buffer holding a canary
//! has grown and been dropped, the test reads its own process's writable anonymous memory (the
//! heap and anonymous mappings, through `/proc/self/mem`: no unsafe code) and counts the
//! canaries still there. The control, a plain `Vec<u8>` grown the same way, shows that the
//! scan finds what a growing buffer leaves behind.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Mutex;

use modelhub_core::secret::SecretBytes;

/// One scan at a time: the tests of this binary share the process's memory.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A canary made at run time (so no copy sits in the binary's read-only data), after 64 filler
/// bytes (the allocator writes its own bookkeeping over the first bytes of a freed block).
fn canary() -> Vec<u8> {
    let mut c = vec![0x11u8; 64];
    c.extend((0u8..24).map(|i| i.wrapping_mul(37) ^ 0xa5));
    c
}

/// How many times `needle` occurs in the process's writable anonymous memory.
fn occurrences_in_memory(needle: &[u8]) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mut mem = std::fs::File::open("/proc/self/mem").unwrap();
    let mut found = 0;
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let anonymous = fields.len() < 6 || fields[5] == "[heap]";
        if !fields[1].starts_with("rw") || !anonymous {
            continue;
        }
        let (start, end) = fields[0].split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let mut region = vec![0u8; (end - start) as usize];
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut region).is_err() {
            continue;
        }
        found += region
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count();
    }
    found
}

/// Grows a buffer from the canary through many small sizes (freed blocks stay in the heap)
/// to about 64 KiB. Small allocations made in between keep the allocator from growing the
/// buffer in place, as the rest of a busy process would.
fn grow(mut push: impl FnMut(&[u8]), secret: &[u8]) -> Vec<Vec<u8>> {
    push(secret);
    let piece = [7u8; 97];
    let mut others = Vec::new();
    for i in 0..650 {
        push(&piece);
        others.push(vec![i as u8; 48]);
    }
    others
}

#[test]
fn a_growing_secret_buffer_leaves_no_copy_in_memory() {
    let _one = ONE_AT_A_TIME.lock().unwrap();
    let mut secret = canary();
    let mut buf = SecretBytes::new();
    let _others = grow(|b| buf.extend_from_slice(b), &secret);
    assert!(buf.starts_with(&secret) && buf.len() > 60_000);
    drop(buf);
    // The needle itself is in memory once; wipe it and search for its tail only.
    let needle = secret[64..].to_vec();
    secret.fill(0);
    assert_eq!(
        occurrences_in_memory(&needle),
        1,
        "copies of the secret left in memory (1 is the needle)"
    );
}

#[test]
fn a_growing_vec_leaves_copies_the_scan_finds() {
    let _one = ONE_AT_A_TIME.lock().unwrap();
    let mut secret = canary();
    // Another canary than the test above's.
    secret[70] ^= 0xff;
    let mut buf = Vec::new();
    let _others = grow(|b| buf.extend_from_slice(b), &secret);
    drop(buf);
    let needle = secret[64..].to_vec();
    secret.fill(0);
    let found = occurrences_in_memory(&needle);
    assert!(found > 2, "the control found {found} (1 is the needle)");
}
