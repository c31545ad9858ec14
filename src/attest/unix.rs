//! The Unix attestor: SO_PEERCRED (uid, gid, pid) captured at accept, then /proc for the
//! executable path, its SHA-256 and the container id.
//!
//! PID reuse: at accept we open a pidfd for the peer and note its start time. At request
//! time /proc/<pid> is opened once as a directory fd and everything is read through it;
//! afterwards the pidfd must still be alive and the start time unchanged. A caller that
//! exited (even if its connection lives on in a child) or whose PID now names another
//! process gets no selectors. This is the same approach as SPIRE's peer tracker, with a
//! pidfd added.
//!
//! Credentials now, not at connect: SO_PEERCRED is what the caller was when it connected.
//! At request time the real, effective, saved and filesystem uids and gids in
//! /proc/<pid>/status (read through the same pinned directory fd) must all equal the
//! connect-time uid and gid; a process that switched user since, or holds another user's
//! id it could switch back to, gets no selectors.

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fs::{Mode, OFlags};
use rustix::process::{Pid, PidfdFlags};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

use super::{AttestError, Attestation, Attestor, CallerSummary};
use crate::identity::{Selector, Selectors};

/// Peer facts captured at accept time, before the caller can hand the connection on.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    pidfd: Option<Arc<OwnedFd>>,
    start_time: Option<u64>,
}

impl PeerInfo {
    pub fn capture(stream: &UnixStream) -> Self {
        let cred = stream.peer_cred().ok();
        let pid = cred.as_ref().and_then(|c| c.pid()).filter(|p| *p > 0);
        let pidfd = pid
            .and_then(Pid::from_raw)
            .and_then(|p| rustix::process::pidfd_open(p, PidfdFlags::empty()).ok())
            .map(Arc::new);
        let start_time = pid.and_then(|p| {
            let dir = open_proc(p).ok()?;
            read_stat(&dir).ok().map(|s| s.start_time)
        });
        Self {
            uid: cred.as_ref().map_or(u32::MAX, |c| c.uid()),
            gid: cred.as_ref().map_or(u32::MAX, |c| c.gid()),
            pid: if cred.is_some() { pid } else { None },
            pidfd,
            start_time,
        }
    }

    /// A peer whose credentials could not be read (for tests of that path).
    pub fn without_credentials() -> Self {
        Self { uid: u32::MAX, gid: u32::MAX, pid: None, pidfd: None, start_time: None }
    }
}

/// A connection on the workload socket, carrying what was captured at accept.
pub struct PeerStream {
    inner: UnixStream,
    info: PeerInfo,
}

impl PeerStream {
    pub fn new(inner: UnixStream) -> Self {
        let info = PeerInfo::capture(&inner);
        Self { inner, info }
    }
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Cache key for executable hashes: the file's identity and change times. A rewritten
/// binary changes mtime/ctime (ctime cannot be set from user space), so it is re-hashed.
type ExeKey = (u64, u64, u64, i64, i64, i64, i64);

pub struct UnixAttestor {
    daemon_uid: u32,
    max_binary_bytes: u64,
    hashes: moka::sync::Cache<ExeKey, String>,
}

impl UnixAttestor {
    pub fn new(max_binary_bytes: u64) -> Self {
        Self { daemon_uid: rustix::process::geteuid().as_raw(), max_binary_bytes, hashes: moka::sync::Cache::new(4096) }
    }

    /// The executable's hash from the cache, keyed by what `stat` of `/proc/<pid>/exe` says
    /// (the same key `exe_sha256` stores under): no open, no read. `Some(None)`: over the cap.
    fn cached_sha256(&self, dir: &OwnedFd) -> Option<Option<String>> {
        let st = rustix::fs::statat(dir, "exe", rustix::fs::AtFlags::empty()).ok()?;
        let len = u64::try_from(st.st_size).ok()?;
        if len > self.max_binary_bytes {
            return Some(None);
        }
        let key = (
            st.st_dev,
            st.st_ino,
            len,
            st.st_mtime,
            i64::try_from(st.st_mtime_nsec).ok()?,
            st.st_ctime,
            i64::try_from(st.st_ctime_nsec).ok()?,
        );
        self.hashes.get(&key).map(Some)
    }

    /// The executable's SHA-256 (`None` over the size cap); with `hash: false`, `Err(None)`
    /// when it is not cached (hashing reads the whole file).
    fn exe_sha256(&self, file: &mut File, hash: bool) -> Result<Option<String>, Option<std::io::Error>> {
        let meta = file.metadata()?;
        if meta.len() > self.max_binary_bytes {
            return Ok(None);
        }
        let key =
            (meta.dev(), meta.ino(), meta.len(), meta.mtime(), meta.mtime_nsec(), meta.ctime(), meta.ctime_nsec());
        if let Some(hit) = self.hashes.get(&key) {
            return Ok(Some(hit));
        }
        if !hash {
            return Err(None);
        }
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > self.max_binary_bytes {
                return Ok(None);
            }
            ctx.update(&buf[..n]);
        }
        let digest = hex::encode(ctx.finish());
        self.hashes.insert(key, digest.clone());
        Ok(Some(digest))
    }
}

impl Attestor for UnixAttestor {
    fn attest(&self, peer: &PeerInfo) -> Result<Attestation, AttestError> {
        // Why this cannot be `None`: with `hash: true` nothing is left undone.
        self.attest_with(peer, true).unwrap_or(Err(AttestError::PeerWithoutCredentials))
    }

    fn attest_cached(&self, peer: &PeerInfo) -> Option<Result<Attestation, AttestError>> {
        self.attest_with(peer, false)
    }
}

impl UnixAttestor {
    /// Everything below, with `hash: false`, gives up (`None`) where the executable would
    /// have to be hashed; every other step is a few reads of /proc.
    fn attest_with(&self, peer: &PeerInfo, hash: bool) -> Option<Result<Attestation, AttestError>> {
        self.attest_steps(peer, hash).transpose()
    }

    fn attest_steps(&self, peer: &PeerInfo, hash: bool) -> Result<Option<Attestation>, AttestError> {
        let pid = peer.pid.ok_or(AttestError::PeerWithoutCredentials)?;
        let exited = AttestError::CallerExited { pid };
        let (pidfd, start_time) = match (&peer.pidfd, peer.start_time) {
            (Some(fd), Some(t)) => (fd, t),
            _ => return Err(exited),
        };
        if has_exited(pidfd) {
            return Err(exited);
        }
        let proc_err = |why: String| AttestError::Proc { pid, why };
        // Why no start-time check here as well: the pidfd above and the check after
        // everything is read (pidfd, then start time) are what prove the process is the one
        // that connected; one here would only fail a little sooner.
        let dir = open_proc(pid).map_err(|_| exited.clone())?;

        let ids = read_at(&dir, "status")
            .ok()
            .and_then(|text| parse_ids(&text))
            .ok_or_else(|| proc_err("status: no Uid/Gid lines".into()))?;
        if !ids.all_are(peer.uid, peer.gid) {
            return Err(AttestError::CredentialsChanged {
                pid,
                uid: peer.uid,
                gid: peer.gid,
                now_uids: ids.uids.map(|u| u.to_string()).join("/"),
                now_gids: ids.gids.map(|g| g.to_string()).join("/"),
            });
        }

        let exe = rustix::fs::readlinkat(&dir, "exe", Vec::new())
            .map(|p| p.to_string_lossy().into_owned())
            .map_err(|e| proc_err(format!("exe: {e}")))?;
        let sha256 = match self.cached_sha256(&dir) {
            Some(known) => known,
            None => {
                let mut exe_file = rustix::fs::openat(&dir, "exe", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
                    .map(File::from)
                    .map_err(|e| proc_err(format!("exe: {e}")))?;
                match self.exe_sha256(&mut exe_file, hash) {
                    Ok(h) => h,
                    Err(None) => return Ok(None),
                    Err(Some(e)) => return Err(proc_err(format!("exe: {e}"))),
                }
            }
        };
        if sha256.is_none() {
            tracing::warn!(
                pid,
                exe,
                limit = self.max_binary_bytes,
                "executable over the hash size cap; no unix:sha256 selector"
            );
        }
        let container = read_at(&dir, "cgroup").ok().and_then(|text| container_id(&text));

        // Why: everything above was read through `dir`, which pins the process we opened;
        // if that process is gone or is no longer the one that connected, discard it all.
        let still = read_stat(&dir).map_err(|_| exited.clone())?;
        if has_exited(pidfd) || still.start_time != start_time || still.is_dead() {
            return Err(exited);
        }

        let mut selectors = Selectors::new();
        selectors.insert(Selector::new("unix", "uid", peer.uid));
        selectors.insert(Selector::new("unix", "gid", peer.gid));
        if peer.uid == self.daemon_uid {
            selectors.insert(Selector::new("unix", "uid", "self"));
        }
        selectors.insert(Selector::new("unix", "path", &exe));
        if let Some(h) = &sha256 {
            selectors.insert(Selector::new("unix", "sha256", h));
        }
        if let Some(c) = &container {
            selectors.insert(Selector::new("unix", "container", c));
        }
        Ok(Some(Attestation {
            selectors,
            caller: CallerSummary { uid: peer.uid, gid: peer.gid, pid, exe: Some(exe), sha256, container },
        }))
    }
}

fn open_proc(pid: i32) -> rustix::io::Result<OwnedFd> {
    rustix::fs::open(format!("/proc/{pid}"), OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
}

fn read_at(dir: &OwnedFd, name: &str) -> std::io::Result<String> {
    let fd = rustix::fs::openat(dir, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
    let mut file = File::from(fd);
    // Why one read is usually enough: stat, status and cgroup are generated whole on each
    // read and are far under 4 KiB; a full buffer means there may be more, read to the end.
    let mut buf = vec![0u8; 4096];
    let n = file.read(&mut buf)?;
    buf.truncate(n);
    if n == 4096 {
        file.take(1 << 20).read_to_end(&mut buf)?;
    }
    String::from_utf8(buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

struct Stat {
    state: char,
    start_time: u64,
}

impl Stat {
    fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

fn read_stat(dir: &OwnedFd) -> std::io::Result<Stat> {
    parse_stat(&read_at(dir, "stat")?).ok_or_else(|| std::io::Error::other("malformed /proc/<pid>/stat"))
}

/// `pid (comm) state ppid ...`: comm may hold spaces and parentheses, so fields are counted
/// from the last `)`. starttime is field 22.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat { state: fields.first()?.chars().next()?, start_time: fields.get(19)?.parse().ok()? })
}

/// The `Uid:` and `Gid:` lines of /proc/<pid>/status: real, effective, saved, filesystem.
#[derive(Debug, PartialEq, Eq)]
struct Ids {
    uids: [u32; 4],
    gids: [u32; 4],
}

impl Ids {
    fn all_are(&self, uid: u32, gid: u32) -> bool {
        self.uids.iter().all(|u| *u == uid) && self.gids.iter().all(|g| *g == gid)
    }
}

fn parse_ids(status: &str) -> Option<Ids> {
    let four = |key: &str| -> Option<[u32; 4]> {
        let line = status.lines().find_map(|l| l.strip_prefix(key))?;
        let mut ids = line.split_whitespace().map(|v| v.parse::<u32>().ok());
        let out = [ids.next()??, ids.next()??, ids.next()??, ids.next()??];
        ids.next().is_none().then_some(out)
    };
    Some(Ids { uids: four("Uid:")?, gids: four("Gid:")? })
}

fn has_exited(pidfd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
    let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
    match rustix::event::poll(&mut fds, Some(&zero)) {
        Ok(0) => false,
        // Readable (or an error on the fd) means the process is gone: fail closed.
        _ => true,
    }
}

/// A 64-hex container id from a cgroup path (docker, containerd/CRI, CRI-O, podman).
fn container_id(cgroup: &str) -> Option<String> {
    for line in cgroup.lines() {
        let path = line.splitn(3, ':').nth(2)?;
        for segment in path.rsplit('/') {
            let mut s = segment.strip_suffix(".scope").unwrap_or(segment);
            for prefix in ["docker-", "cri-containerd-", "crio-", "libpod-"] {
                s = s.strip_prefix(prefix).unwrap_or(s);
            }
            if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Some(s.to_ascii_lowercase());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_hostile_process_names() {
        let line = "1234 (evil) 9 R (x) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 424242 99 100\n";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.start_time, 424242);
    }

    #[test]
    fn status_ids_are_read_and_must_all_match_the_connect_time_ones() {
        let status = "Name:\tpython3\nUmask:\t0022\nUid:\t0\t65534\t65534\t65534\nGid:\t0\t0\t0\t0\nGroups:\t0\n";
        let ids = parse_ids(status).unwrap();
        assert_eq!(ids, Ids { uids: [0, 65534, 65534, 65534], gids: [0; 4] });
        assert!(!ids.all_are(0, 0), "effective uid changed");
        assert!(!ids.all_are(65534, 0), "the real uid is still root: it could switch back");
        let same = parse_ids("Uid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\n").unwrap();
        assert!(same.all_are(1000, 100));
        assert!(!same.all_are(1000, 101));
        assert_eq!(parse_ids("Uid:\t1\t2\t3\nGid:\t1\t1\t1\t1\n"), None, "three fields is malformed");
        assert_eq!(parse_ids("Name:\tx\n"), None);
    }

    #[test]
    fn container_ids_are_found_in_common_cgroup_layouts() {
        let id = "a".repeat(64);
        assert_eq!(container_id(&format!("0::/system.slice/docker-{id}.scope\n")), Some(id.clone()));
        assert_eq!(container_id(&format!("0::/kubepods/besteffort/pod1234/{id}\n")), Some(id.clone()));
        assert_eq!(container_id(&format!("0::/kubepods.slice/cri-containerd-{id}.scope\n")), Some(id));
        assert_eq!(container_id("0::/user.slice/user-1000.slice/session-2.scope\n"), None);
    }

    #[tokio::test]
    async fn attests_a_live_peer_and_refuses_one_without_credentials() {
        let (a, _b) = UnixStream::pair().unwrap();
        let peer = PeerInfo::capture(&a);
        let att = UnixAttestor::new(1 << 30).attest(&peer).unwrap();
        let me = rustix::process::geteuid().as_raw();
        assert!(att.selectors.contains(&Selector::new("unix", "uid", me)));
        assert!(att.selectors.contains(&Selector::new("unix", "uid", "self")));
        let exe = std::env::current_exe().unwrap();
        assert!(att.selectors.contains(&Selector::new("unix", "path", exe.display())));
        let sha = att.caller.sha256.clone().unwrap();
        let expected =
            hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &std::fs::read(&exe).unwrap()));
        assert_eq!(sha, expected);
        assert_eq!(
            UnixAttestor::new(1 << 30).attest(&PeerInfo::without_credentials()),
            Err(AttestError::PeerWithoutCredentials)
        );
    }

    #[tokio::test]
    async fn the_cached_path_gives_way_until_the_binary_is_hashed_then_answers_the_same() {
        let (a, _b) = UnixStream::pair().unwrap();
        let peer = PeerInfo::capture(&a);
        let attestor = UnixAttestor::new(1 << 30);
        assert_eq!(attestor.attest_cached(&peer), None, "hashing the executable is left to a blocking thread");
        let full = attestor.attest(&peer).unwrap();
        assert_eq!(attestor.attest_cached(&peer), Some(Ok(full)));
        assert_eq!(
            attestor.attest_cached(&PeerInfo::without_credentials()),
            Some(Err(AttestError::PeerWithoutCredentials))
        );
    }

    #[tokio::test]
    async fn binaries_over_the_size_cap_get_no_hash_selector() {
        let (a, _b) = UnixStream::pair().unwrap();
        let att = UnixAttestor::new(1024).attest(&PeerInfo::capture(&a)).unwrap();
        assert!(att.caller.sha256.is_none());
        assert!(!att.selectors.iter().any(|s| s.as_str().starts_with("unix:sha256:")));
    }
}
