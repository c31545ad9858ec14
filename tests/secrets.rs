//! Secrets out of reach: after the daemon sends a workload the key it made for its X509-SVID,
//! and after a JWT signing key is generated, written and dropped, no copy of the key is
//! left in the process's memory.
//!
//! How it is checked: the test scans every writable private mapping of its own process
//! (heap, thread stacks, anonymous maps, `.data`/`.bss`) through /proc/self/maps and
//! /proc/self/mem for the key bytes. The needle is kept bitwise inverted and compared
//! inverted, so the scan itself holds no copy; the key is read out of the reply without a
//! copy (a hand-rolled protobuf walk over the reply buffer) and the reply is zeroized
//! before the scan. The client is curl, another process, so its buffers are not ours.
//! A control plants a copy the scan must find.
#![expect(clippy::unwrap_used, reason = "tests fail loudly on any unexpected error")]

mod support;

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant};

use support::setup;
use zeroize::{Zeroize, Zeroizing};

/// How many times `needle` (given inverted) occurs in this process's writable private memory.
fn occurrences_in_own_memory(inverted: &[u8]) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mut mem = std::fs::File::open("/proc/self/mem").unwrap();
    let mut buf = Zeroizing::new(vec![0u8; 1 << 20]);
    let n = inverted.len();
    let first = !inverted[0];
    let mut found = 0;
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (range, perms) = (fields[0], fields[1]);
        let name = fields.get(5).copied().unwrap_or("");
        if !perms.starts_with("rw") || !perms.ends_with('p') || name == "[vvar]" || name == "[vsyscall]" {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let (start, end) = (u64::from_str_radix(start, 16).unwrap(), u64::from_str_radix(end, 16).unwrap());
        let mut at = start;
        while at < end {
            let want = usize::try_from((end - at).min(buf.len() as u64)).unwrap();
            if mem.seek(SeekFrom::Start(at)).is_err() {
                break;
            }
            let Ok(got) = mem.read(&mut buf[..want]) else { break };
            if got == 0 {
                break;
            }
            let chunk = &buf[..got];
            let mut i = 0;
            while i + n <= got {
                match chunk[i..got - n + 1].iter().position(|b| *b == first) {
                    None => break,
                    Some(p) => {
                        let j = i + p;
                        if chunk[j..j + n].iter().zip(inverted).all(|(m, inv)| *m == !inv) {
                            found += 1;
                        }
                        i = j + 1;
                    }
                }
            }
            // Overlap by n-1 so a copy across two chunks is seen.
            at += if got > n { (got - (n - 1)) as u64 } else { got as u64 };
            buf[..got].zeroize();
        }
    }
    found
}

fn inverted(bytes: &[u8]) -> Vec<u8> {
    bytes.iter().map(|b| !b).collect()
}

/// Protobuf: the first length-delimited field `number` of `message`, as a slice of it.
fn field(message: &[u8], number: u64) -> Option<&[u8]> {
    let mut i = 0;
    let varint = |i: &mut usize| -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *message.get(*i)?;
            *i += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    };
    while i < message.len() {
        let key = varint(&mut i)?;
        match key & 7 {
            0 => {
                varint(&mut i)?;
            }
            2 => {
                let len = usize::try_from(varint(&mut i)?).ok()?;
                let value = message.get(i..i + len)?;
                if key >> 3 == number {
                    return Some(value);
                }
                i += len;
            }
            _ => return None,
        }
    }
    None
}

/// The 32-byte private scalar inside a P-256 PKCS#8 key (ECPrivateKey: version 1, OCTET STRING 32).
fn scalar(pkcs8: &[u8]) -> &[u8] {
    let at = pkcs8.windows(5).position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20]).unwrap() + 5;
    &pkcs8[at..at + 32]
}

#[tokio::test(flavor = "multi_thread")]
async fn after_fetch_x509svid_no_copy_of_the_server_made_key_is_left_in_memory() {
    let curl = std::process::Command::new("curl").arg("--version").output();
    if !curl.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("HTTP2")) {
        eprintln!("skipped: curl with HTTP/2 is needed as the outside client");
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let d = setup(home.path()).start().await;
    let dir = tempfile::tempdir().unwrap();
    let (request, reply) = (dir.path().join("request.bin"), dir.path().join("reply.bin"));
    // One empty X509SVIDRequest as a gRPC message.
    std::fs::write(&request, [0u8; 5]).unwrap();
    let mut curl = std::process::Command::new("curl")
        .args(["-s", "-N", "--http2-prior-knowledge", "--unix-socket"])
        .arg(&d.socket)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers", "-H", "workload.spiffe.io: true"])
        .arg("--data-binary")
        .arg(format!("@{}", request.display()))
        .arg("-o")
        .arg(&reply)
        .arg("http://localhost/SpiffeWorkloadAPI/FetchX509SVID")
        .spawn()
        .unwrap();
    // The stream stays open (renewals); once the first message is written, curl is stopped.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&reply).map_or(0, |m| m.len()) < 600 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    curl.kill().unwrap();
    curl.wait().unwrap();
    // The connection is gone: the stream's task ends and h2 drops what it held.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut bytes = Zeroizing::new(std::fs::read(&reply).unwrap());
    std::fs::remove_file(&reply).unwrap();
    let message = &bytes[5..];
    let svid = field(message, 1).expect("an X509SVID in the first message");
    let key = field(svid, 3).expect("the server-made key");
    assert!(key.len() > 100, "a PKCS#8 key");
    let (key_needle, scalar_needle) = (inverted(key), inverted(scalar(key)));
    bytes.zeroize();
    drop(bytes);

    let (der_copies, scalar_copies) =
        (occurrences_in_own_memory(&key_needle), occurrences_in_own_memory(&scalar_needle));
    // Control: a copy planted now is found, so the scan sees the heap.
    let planted: Vec<u8> = inverted(&key_needle);
    let with_planted = occurrences_in_own_memory(&key_needle);
    drop(planted);
    assert!(with_planted > der_copies, "the scan did not see a planted copy");
    assert_eq!(
        (der_copies, scalar_copies),
        (0, 0),
        "copies of the sent key (DER, raw scalar) left in the daemon's memory"
    );
    d.stop().await;
}

#[test]
fn a_generated_and_persisted_jwt_key_leaves_no_copy_once_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let key = mayfly::keys::JwtKey::load_or_generate(dir.path()).unwrap();
    let der_needle = inverted(key.pkcs8_der());
    drop(key);
    let path = dir.path().join(mayfly::keys::JWT_KEY_FILE);
    // The PEM body (base64) is a copy too: the file's second line, inverted.
    let pem = Zeroizing::new(std::fs::read_to_string(&path).unwrap());
    let line_needle = inverted(pem.lines().nth(1).unwrap().as_bytes());
    drop(pem);
    // Loading it again and dropping it leaves nothing either.
    drop(mayfly::keys::JwtKey::load(Path::new(&path)).unwrap());
    assert_eq!(
        (occurrences_in_own_memory(&der_needle), occurrences_in_own_memory(&line_needle)),
        (0, 0),
        "copies of the JWT signing key (DER, PEM) left in memory"
    );
}
