//! A synchronous QMP client.
//!
//! QEMU interleaves asynchronous events with command replies on the same stream. There is no
//! reader thread: whichever caller is waiting (for a reply or an event) reads the socket itself,
//! routing replies to the callers waiting for their `id` and events to a queue; the others wait
//! until it hands over. The monitor fetches registers every pass, and a thread hand-off per reply
//! (two futex calls and two context switches) cost as much CPU as the rest of the round trip.
//! Callers use `&self` from any thread; the connection is shared.

use crate::error::{shorten, Error, Result};
use kvmaccess_core::InvalidationEpoch;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long to wait for the `{"QMP": ...}` greeting after connecting.
pub const DEFAULT_GREETING_TIMEOUT: Duration = Duration::from_secs(3);
/// How long to wait for a command's reply unless changed with [`QmpClient::set_timeout`].
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Events kept while nobody polls them. Older ones are dropped and counted
/// ([`QmpClient::dropped_events`]) so that a long-running monitor that never polls cannot grow
/// without bound; the resume generation counter is updated regardless.
pub const EVENT_QUEUE_LIMIT: usize = 4096;

/// One asynchronous QMP event, or the synthetic [`QmpEvent::CONNECTION_CLOSED`].
#[derive(Clone, Debug, PartialEq)]
pub struct QmpEvent {
    /// Event name as QEMU sends it: `STOP`, `RESUME`, `SHUTDOWN`, `GUEST_PANICKED`, `RESET`, ...
    pub name: String,
    /// The event's `data` member, or `Null`.
    pub data: Value,
    /// QEMU's timestamp in microseconds since the Unix epoch, when present.
    pub timestamp_us: Option<u64>,
}

impl QmpEvent {
    /// Name of the event this client queues when the connection ends (QEMU exited or closed it).
    pub const CONNECTION_CLOSED: &'static str = "KVMACCESS_CONNECTION_CLOSED";

    fn from_message(msg: &Value) -> Option<Self> {
        let name = msg.get("event")?.as_str()?.to_string();
        let timestamp_us = msg.get("timestamp").and_then(|t| {
            let s = t.get("seconds")?.as_u64()?;
            let us = t.get("microseconds")?.as_u64()?;
            s.checked_mul(1_000_000)?.checked_add(us)
        });
        Some(Self {
            name,
            data: msg.get("data").cloned().unwrap_or(Value::Null),
            timestamp_us,
        })
    }

    /// Whether this is the synthetic end-of-connection event.
    pub fn is_connection_closed(&self) -> bool {
        self.name == Self::CONNECTION_CLOSED
    }
}

/// Bytes one read of the socket takes at most.
const READ_CHUNK: usize = 16 << 10;

/// What routing needs of a message from QEMU; everything else is skipped unparsed.
#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    event: Option<IgnoredAny>,
    /// Ours are numbers; anything else is not a reply to us.
    #[serde(default)]
    id: Option<Value>,
}

/// A command's reply: its return value of the type the caller expects, or QEMU's error.
#[derive(Deserialize)]
struct Reply<T> {
    #[serde(rename = "return")]
    returned: Option<T>,
    error: Option<ReplyError>,
}

#[derive(Deserialize)]
struct ReplyError {
    #[serde(default)]
    class: Option<String>,
    #[serde(default)]
    desc: Option<String>,
}

/// A command as QEMU reads it.
#[derive(Serialize)]
struct Request<'a, A: Serialize> {
    execute: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<A>,
    id: u64,
}

#[derive(Default)]
struct State {
    /// The receiving half while nobody reads; `None` while a caller reads it outside the lock.
    reader: Option<LineReader>,
    /// Ids whose callers still wait for a reply.
    waiting: HashSet<u64>,
    /// Replies read for waiting callers, not yet taken, as QEMU sent them: each caller parses
    /// its own into the type it expects.
    replies: HashMap<u64, Vec<u8>>,
    events: VecDeque<QmpEvent>,
    dropped_events: u64,
    closed: bool,
    /// Callers sleeping on [`Shared::progress`]; without any, signalling it is a wasted syscall.
    sleepers: usize,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled whenever a message was routed or the reading role was handed back.
    progress: Condvar,
    /// Bumped on every RESUME and RESET event; see [`QmpClient::generation`].
    generation: InvalidationEpoch,
}

impl Shared {
    /// The state is plain data with no invariant a panicking holder could break half-way, so a
    /// poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push_event(&self, st: &mut State, event: QmpEvent) {
        if matches!(event.name.as_str(), "RESUME" | "RESET") {
            self.generation.bump();
        }
        if st.events.len() >= EVENT_QUEUE_LIMIT {
            st.events.pop_front();
            st.dropped_events = st.dropped_events.saturating_add(1);
        }
        st.events.push_back(event);
    }

    /// Routes one line from QEMU: an event to the queue, a reply to its waiting caller.
    fn route(&self, st: &mut State, line: Vec<u8>) {
        // Only the envelope is decoded here: a reply (the register dump is kilobytes of text)
        // is parsed once, by its caller, into what that caller wants.
        let Ok(envelope) = serde_json::from_slice::<Envelope>(&line) else {
            // QEMU only sends JSON objects; a garbled line cannot be routed, and dropping it
            // keeps the connection usable for everything else.
            return;
        };
        if envelope.event.is_some() {
            let event = serde_json::from_slice::<Value>(&line)
                .ok()
                .and_then(|msg| QmpEvent::from_message(&msg));
            if let Some(event) = event {
                self.push_event(st, event);
            }
            return;
        }
        if let Some(id) = envelope.id.as_ref().and_then(Value::as_u64) {
            // A reply nobody waits for any more (its caller timed out) is dropped.
            if st.waiting.contains(&id) {
                st.replies.insert(id, line);
            }
        }
    }

    fn close(&self, st: &mut State) {
        if st.closed {
            return;
        }
        st.closed = true;
        st.reader = None;
        self.push_event(
            st,
            QmpEvent {
                name: QmpEvent::CONNECTION_CLOSED.to_string(),
                data: Value::Null,
                timestamp_us: None,
            },
        );
    }

    /// Waits until `ready` finds what the caller wants, reading the socket itself while no other
    /// caller does. `None` when `deadline` passes first; `ready` sees the closed state too, so
    /// it decides what a closed connection means for it.
    fn wait_until<T>(
        &self,
        deadline: Instant,
        mut ready: impl FnMut(&mut State) -> Option<T>,
    ) -> Option<T> {
        let mut st = self.lock();
        loop {
            if let Some(found) = ready(&mut st) {
                return Some(found);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            if left.is_zero() || st.closed {
                return None;
            }
            let Some(mut reader) = st.reader.take() else {
                // Another caller reads; it routes what we wait for and signals.
                st.sleepers += 1;
                st = self
                    .progress
                    .wait_timeout(st, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                st.sleepers -= 1;
                continue;
            };
            drop(st);
            let got = reader.next_line_within(left);
            st = self.lock();
            match got {
                Ok(Some(line)) => {
                    st.reader = Some(reader);
                    self.route(&mut st, line);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    st.reader = Some(reader);
                }
                // Any other read error ends the connection like EOF: no more replies can come.
                Ok(None) | Err(_) => self.close(&mut st),
            }
            if st.sleepers > 0 {
                self.progress.notify_all();
            }
        }
    }

    /// Routes whatever QEMU has already sent, without waiting, unless another caller is reading
    /// (it routes it then).
    fn drain_available(&self) {
        let mut st = self.lock();
        let Some(mut reader) = st.reader.take() else {
            return;
        };
        drop(st);
        let mut lines = Vec::new();
        let end = loop {
            match reader.next_line_available() {
                Ok(Some(line)) => lines.push(line),
                Ok(None) => break false,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                Err(_) => break true,
            }
            if lines.len() >= EVENT_QUEUE_LIMIT {
                break false;
            }
        };
        st = self.lock();
        for line in lines {
            self.route(&mut st, line);
        }
        if end || reader.eof {
            self.close(&mut st);
        } else {
            st.reader = Some(reader);
        }
        if st.sleepers > 0 {
            self.progress.notify_all();
        }
    }
}

/// Reads newline-terminated messages, keeping any bytes past the newline for the next call.
struct LineReader {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Bytes at the start of `buf` already known to hold no newline: a reply arriving in
    /// several reads is not searched again from its start after each.
    scanned: usize,
    /// Where reads land before they join `buf`; zeroed once, not on every read.
    chunk: Box<[u8]>,
    /// The receive timeout last set on the socket, to set it only when it changes: a command
    /// waits with the same timeout every time.
    timeout: Option<Duration>,
    /// The peer closed its end (seen by a non-blocking read).
    eof: bool,
}

impl LineReader {
    fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            buf: Vec::new(),
            scanned: 0,
            chunk: vec![0; READ_CHUNK].into_boxed_slice(),
            timeout: None,
            eof: false,
        }
    }

    fn take_line(&mut self) -> Option<Vec<u8>> {
        let unscanned = self.buf.get(self.scanned..).unwrap_or_default();
        let Some(found) = memchr::memchr(b'\n', unscanned) else {
            self.scanned = self.buf.len();
            return None;
        };
        let end = self.scanned + found;
        let line = self.buf.get(..end).unwrap_or_default().to_vec();
        self.buf.drain(..=end);
        self.scanned = 0;
        Some(line)
    }

    fn fill(&mut self) -> std::io::Result<usize> {
        loop {
            match self.stream.read(&mut self.chunk) {
                Ok(n) => {
                    self.buf
                        .extend_from_slice(self.chunk.get(..n).unwrap_or_default());
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The next line without its terminator, `Ok(None)` at end of stream, or `TimedOut` /
    /// `WouldBlock` after `limit` with a partial line still buffered.
    fn next_line_within(&mut self, limit: Duration) -> std::io::Result<Option<Vec<u8>>> {
        if let Some(line) = self.take_line() {
            return Ok(Some(line));
        }
        // Whole milliseconds, rounded up: the same wait gives the same value, and a zero timeout
        // would mean "block forever" to the socket.
        let millis = limit.as_millis().clamp(1, u128::from(u32::MAX));
        let timeout = Duration::from_millis(u64::try_from(millis).unwrap_or(u64::from(u32::MAX)));
        if self.timeout != Some(timeout) {
            self.stream.set_read_timeout(Some(timeout))?;
            self.timeout = Some(timeout);
        }
        let started = Instant::now();
        loop {
            if let Some(line) = self.take_line() {
                return Ok(Some(line));
            }
            if started.elapsed() >= limit {
                return Err(ErrorKind::TimedOut.into());
            }
            if self.fill()? == 0 {
                return Ok(None);
            }
        }
    }

    /// A line QEMU has already sent, without blocking: `WouldBlock` when there is none yet.
    fn next_line_available(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(line) = self.take_line() {
                return Ok(Some(line));
            }
            if self.eof {
                return Ok(None);
            }
            if self.fill_available()? == 0 {
                self.eof = true;
            }
        }
    }

    /// One read that does not wait. `MSG_DONTWAIT` rather than `O_NONBLOCK`: the flag would
    /// be shared with the writing half (a dup of the same open file) while another thread
    /// sends a command.
    fn fill_available(&mut self) -> std::io::Result<usize> {
        let chunk = &mut self.chunk;
        loop {
            // SAFETY: the fd is the live socket owned by `self.stream` for the whole call, and
            // `chunk` is a writable buffer of exactly the length passed, so the kernel writes
            // only into memory we own.
            let n = unsafe {
                libc::recv(
                    self.stream.as_raw_fd(),
                    chunk.as_mut_ptr().cast::<libc::c_void>(),
                    chunk.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            match usize::try_from(n) {
                Ok(n) => {
                    self.buf
                        .extend_from_slice(chunk.get(..n).unwrap_or_default());
                    return Ok(n);
                }
                Err(_) => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }
}

/// A connection to QEMU's QMP monitor.
///
/// All methods take `&self`; a mutex serialises writes and the waiting callers share the reading
/// (see the module documentation), so one connection can serve memory-layout queries, register
/// reads and pause/resume from several threads.
pub struct QmpClient {
    path: PathBuf,
    writer: Mutex<UnixStream>,
    shared: Shared,
    next_id: AtomicU64,
    timeout_ms: AtomicU64,
    greeting: Value,
    peer_pid: Option<u32>,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("path", &self.path)
            .field("peer_pid", &self.peer_pid)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl QmpClient {
    /// Connect to a QMP unix socket, check the greeting and leave capability negotiation mode.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self> {
        Self::connect_with_timeout(path, DEFAULT_GREETING_TIMEOUT)
    }

    /// Like [`QmpClient::connect`], waiting at most `greeting_timeout` for QEMU's greeting.
    pub fn connect_with_timeout(
        path: impl AsRef<Path>,
        greeting_timeout: Duration,
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let stream = UnixStream::connect(&path).map_err(|source| {
            if source.kind() == ErrorKind::NotFound {
                Error::SocketMissing { path: path.clone() }
            } else {
                Error::SocketConnect {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        let peer_pid = peer_pid(&stream);
        let read_half = stream
            .try_clone()
            .map_err(|e| Error::io("cloning the QMP socket", e))?;
        let mut reader = LineReader::new(read_half);
        let greeting = read_greeting(&mut reader, &path, greeting_timeout)?;
        let shared = Shared::default();
        shared.lock().reader = Some(reader);
        let client = Self {
            path,
            writer: Mutex::new(stream),
            shared,
            next_id: AtomicU64::new(1),
            timeout_ms: AtomicU64::new(millis(DEFAULT_COMMAND_TIMEOUT)),
            greeting,
            peer_pid,
        };
        client.execute("qmp_capabilities", Value::Null)?;
        Ok(client)
    }

    /// The socket path this client is connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// QEMU's greeting object (the value of its `QMP` member: version, capabilities).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// QEMU's version as (major, minor, micro), from the greeting.
    pub fn qemu_version(&self) -> Option<(u64, u64, u64)> {
        let v = self.greeting.get("version")?.get("qemu")?;
        Some((
            v.get("major")?.as_u64()?,
            v.get("minor")?.as_u64()?,
            v.get("micro")?.as_u64()?,
        ))
    }

    /// PID of the process at the other end of the socket (SO_PEERCRED); `None` if the kernel
    /// could not tell (e.g. QEMU runs in another PID namespace).
    pub fn peer_pid(&self) -> Option<u32> {
        self.peer_pid
    }

    /// Change how long [`QmpClient::execute`] waits for a reply.
    pub fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms.store(millis(timeout), Ordering::Relaxed);
    }

    /// Run a QMP command and return its `return` value. `arguments` is omitted when `Null`.
    pub fn execute(&self, command: &str, arguments: Value) -> Result<Value> {
        self.execute_with_timeout(command, arguments, self.timeout())
    }

    /// How long a command waits for its reply unless told otherwise.
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    /// [`QmpClient::execute`] with an explicit reply timeout (e.g. for a long memory dump).
    pub fn execute_with_timeout(
        &self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value> {
        let arguments = (!arguments.is_null()).then_some(arguments);
        self.call(command, arguments, timeout, || command.to_string())
    }

    /// Send `command` and wait for its reply, parsed as `T`. `label` names the command in
    /// errors.
    fn call<T: DeserializeOwned, A: Serialize>(
        &self,
        command: &str,
        arguments: Option<A>,
        timeout: Duration,
        label: impl Fn() -> String,
    ) -> Result<T> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut line = serde_json::to_vec(&Request {
            execute: command,
            arguments,
            id,
        })
        .map_err(|e| Error::protocol("encoding a QMP command", e.to_string()))?;
        line.push(b'\n');

        {
            let mut st = self.shared.lock();
            if st.closed {
                return Err(Error::Closed);
            }
            st.waiting.insert(id);
        }
        let write_result = {
            let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            w.write_all(&line)
        };
        if let Err(e) = write_result {
            self.shared.lock().waiting.remove(&id);
            return Err(match e.kind() {
                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::NotConnected => {
                    Error::Closed
                }
                _ => Error::io(format!("sending `{command}` to QEMU"), e),
            });
        }

        let deadline = Instant::now()
            .checked_add(timeout)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
        let reply = self.shared.wait_until(deadline, |st| {
            if let Some(reply) = st.replies.remove(&id) {
                Some(Ok(reply))
            } else if st.closed {
                Some(Err(Error::Closed))
            } else {
                None
            }
        });
        {
            // A reply that came in after the deadline is not kept either.
            let mut st = self.shared.lock();
            st.waiting.remove(&id);
            st.replies.remove(&id);
        }
        match reply {
            Some(Ok(raw)) => interpret(&raw, label),
            Some(Err(e)) => Err(e),
            None => Err(Error::Timeout {
                command: label(),
                secs: timeout.as_secs(),
            }),
        }
    }

    /// Run an HMP command through `human-monitor-command` and return its text output.
    pub fn hmp(&self, command_line: &str) -> Result<String> {
        #[derive(Serialize)]
        struct Arguments<'a> {
            #[serde(rename = "command-line")]
            command_line: &'a str,
        }
        self.call(
            "human-monitor-command",
            Some(Arguments { command_line }),
            self.timeout(),
            || command_line.to_string(),
        )
    }

    /// Take the oldest event, if any has arrived.
    pub fn try_recv_event(&self) -> Option<QmpEvent> {
        // Only an empty queue needs a look at the socket: a caller taking events one by one
        // pays one read for the lot, not one per event.
        if let Some(event) = self.shared.lock().events.pop_front() {
            return Some(event);
        }
        self.shared.drain_available();
        self.shared.lock().events.pop_front()
    }

    /// Wait up to `timeout` for the next event.
    pub fn wait_event(&self, timeout: Duration) -> Option<QmpEvent> {
        self.wait_event_matching(timeout, |_| true)
    }

    /// Wait up to `timeout` for an event called `name` (or the connection to close), taking it from
    /// the queue; other events stay queued in order.
    pub fn wait_for_event(&self, name: &str, timeout: Duration) -> Option<QmpEvent> {
        self.wait_event_matching(timeout, |e| e.name == name || e.is_connection_closed())
    }

    fn wait_event_matching(
        &self,
        timeout: Duration,
        want: impl Fn(&QmpEvent) -> bool,
    ) -> Option<QmpEvent> {
        let deadline = Instant::now()
            .checked_add(timeout)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
        if timeout.is_zero() {
            // No time to wait, but what has arrived still counts.
            self.shared.drain_available();
        }
        self.shared.wait_until(deadline, |st| {
            let pos = st.events.iter().position(&want)?;
            st.events.remove(pos)
        })
    }

    /// Take every event that has arrived.
    pub fn events(&self) -> Vec<QmpEvent> {
        self.shared.drain_available();
        self.shared.lock().events.drain(..).collect()
    }

    /// Events discarded because the queue was full (see [`EVENT_QUEUE_LIMIT`]).
    pub fn dropped_events(&self) -> u64 {
        self.shared.lock().dropped_events
    }

    /// A counter bumped on every `RESUME` and `RESET` event. A cache of guest translations taken
    /// while paused is valid as long as this value has not changed.
    pub fn generation(&self) -> u64 {
        self.shared.drain_available();
        self.shared.generation.current()
    }

    /// Bump the generation counter, for callers that know the guest changed without an event.
    pub fn bump_generation(&self) {
        self.shared.generation.bump();
    }

    /// The generation counter itself, for translation caches to follow. It moves when a
    /// `RESUME` or `RESET` event is read from the socket (any call on this client reads what
    /// has arrived) or when this client resumes the guest.
    pub fn invalidation_epoch(&self) -> InvalidationEpoch {
        self.shared.generation.clone()
    }

    /// Whether QEMU has closed the connection.
    pub fn is_closed(&self) -> bool {
        if self.shared.lock().closed {
            return true;
        }
        self.shared.drain_available();
        self.shared.lock().closed
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn read_greeting(reader: &mut LineReader, path: &Path, timeout: Duration) -> Result<Value> {
    let not_qmp = |got: String| Error::NotQmp {
        path: path.to_path_buf(),
        got,
    };
    match reader.next_line_within(timeout.max(Duration::from_millis(1))) {
        Ok(Some(line)) => {
            let text = String::from_utf8_lossy(&line);
            let msg: Value = serde_json::from_str(text.trim())
                .map_err(|_| not_qmp(format!("{:?}", shorten(text.trim(), 120))))?;
            match msg.get("QMP") {
                Some(g) => Ok(g.clone()),
                None => Err(not_qmp(shorten(&msg.to_string(), 120))),
            }
        }
        Ok(None) => {
            let got = if reader.buf.is_empty() {
                "the connection was closed without a greeting".to_string()
            } else {
                format!("{:?}", shorten(&String::from_utf8_lossy(&reader.buf), 120))
            };
            Err(not_qmp(got))
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Err(not_qmp(nothing_received(&reader.buf, timeout)))
        }
        Err(e) => Err(Error::io(format!("reading from {}", path.display()), e)),
    }
}

fn nothing_received(buf: &[u8], timeout: Duration) -> String {
    if buf.is_empty() {
        format!(
            "nothing within {} ms; if this is QEMU's QMP socket, another client may be connected \
             (QEMU serves one at a time)",
            timeout.as_millis()
        )
    } else {
        format!("{:?}", shorten(&String::from_utf8_lossy(buf), 120))
    }
}

/// PID of the peer of a connected unix socket, via SO_PEERCRED.
fn peer_pid(stream: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).ok()?;
    // SAFETY: the fd is a live socket owned by `stream` for the duration of the call; `cred` is a
    // properly aligned, writable `ucred` and `len` holds its exact size, so the kernel writes at
    // most `len` bytes into memory we own.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc != 0 || cred.pid <= 0 {
        return None;
    }
    u32::try_from(cred.pid).ok()
}

/// A reply line as the caller's type, or QEMU's error for `label`'s command.
fn interpret<T: DeserializeOwned>(raw: &[u8], label: impl Fn() -> String) -> Result<T> {
    let reply: Reply<T> = serde_json::from_slice(raw).map_err(|e| {
        Error::protocol(
            "QMP reply",
            format!("{e}: {}", String::from_utf8_lossy(raw).trim_end()),
        )
    })?;
    match (reply.returned, reply.error) {
        (Some(value), _) => Ok(value),
        (None, Some(err)) => Err(Error::CommandFailed {
            command: label(),
            class: err.class.unwrap_or_else(|| "UnknownClass".to_string()),
            desc: err.desc.unwrap_or_else(|| "(no description)".to_string()),
        }),
        (None, None) => Err(Error::protocol(
            "QMP reply",
            String::from_utf8_lossy(raw).trim_end(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    /// A scripted QMP server: the greeting, then for each request line the lines `answer`
    /// returns (events and/or a reply echoing the request's id).
    fn fake_qemu(
        answer: impl Fn(&Value) -> Vec<Value> + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<()>) {
        fake_qemu_serving(usize::MAX, answer)
    }

    /// [`fake_qemu`] that closes the connection after answering `requests` requests.
    fn fake_qemu_serving(
        requests: usize,
        answer: impl Fn(&Value) -> Vec<Value> + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut out = stream.try_clone().unwrap();
            writeln!(out, r#"{{"QMP": {{"version": {{"qemu": {{"major": 7, "minor": 2, "micro": 0}}}}, "capabilities": []}}}}"#).unwrap();
            for line in std::io::BufReader::new(stream).lines().take(requests) {
                let Ok(line) = line else { break };
                let request: Value = serde_json::from_str(&line).unwrap();
                for msg in answer(&request) {
                    if writeln!(out, "{msg}").is_err() {
                        return;
                    }
                }
            }
        });
        (dir, path, server)
    }

    fn reply(request: &Value, ret: Value) -> Value {
        json!({ "return": ret, "id": request["id"] })
    }

    fn event(name: &str) -> Value {
        json!({ "event": name, "data": {}, "timestamp": { "seconds": 1, "microseconds": 2 } })
    }

    #[test]
    fn replies_and_interleaved_events_are_routed() {
        let (_dir, path, _server) = fake_qemu(|req| match req["execute"].as_str() {
            Some("query-status") => vec![
                event("STOP"),
                reply(req, json!({ "status": "paused" })),
                event("RESUME"),
            ],
            Some("bad") => {
                vec![json!({ "error": { "class": "GenericError", "desc": "no" }, "id": req["id"] })]
            }
            _ => vec![reply(req, json!({}))],
        });
        let qmp = QmpClient::connect(&path).unwrap();
        assert_eq!(qmp.qemu_version(), Some((7, 2, 0)));
        let before = qmp.generation();
        let epoch = qmp.invalidation_epoch();
        let status = qmp.execute("query-status", Value::Null).unwrap();
        assert_eq!(status["status"], "paused");
        let stop = qmp.wait_event(Duration::from_secs(5)).unwrap();
        assert_eq!(
            (stop.name.as_str(), stop.timestamp_us),
            ("STOP", Some(1_000_002))
        );
        assert_eq!(
            qmp.wait_for_event("RESUME", Duration::from_secs(5))
                .unwrap()
                .name,
            "RESUME"
        );
        assert!(qmp.generation() > before);
        // Caches following the epoch see the RESUME without asking the socket.
        assert_eq!(epoch.current(), qmp.generation());
        let err = qmp.execute("bad", Value::Null).unwrap_err().to_string();
        assert!(err.contains("GenericError") || err.contains("no"), "{err}");
        assert!(qmp.wait_event(Duration::from_millis(50)).is_none());
    }

    #[test]
    fn many_threads_share_one_connection() {
        let (_dir, path, _server) = fake_qemu(|req| match req["execute"].as_str() {
            Some("echo") => vec![event("TICK"), reply(req, req["arguments"]["n"].clone())],
            _ => vec![reply(req, json!({}))],
        });
        let qmp = QmpClient::connect(&path).unwrap();
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let qmp = &qmp;
                scope.spawn(move || {
                    for i in 0..200u64 {
                        let n = t * 1000 + i;
                        let got = qmp.execute("echo", json!({ "n": n })).unwrap();
                        assert_eq!(got.as_u64(), Some(n));
                    }
                });
            }
            // A thread waiting for an event all along takes part in the reading as well.
            let qmp = &qmp;
            scope.spawn(move || {
                assert!(qmp
                    .wait_for_event("NEVER", Duration::from_millis(300))
                    .is_none());
            });
        });
        assert_eq!(qmp.events().len(), 800);
    }

    #[test]
    fn a_late_reply_is_not_taken_for_the_next_one_and_garbage_is_skipped() {
        let (_dir, path, _server) = fake_qemu(|req| match req["execute"].as_str() {
            Some("slow") => {
                std::thread::sleep(Duration::from_millis(300));
                vec![reply(req, json!("slow"))]
            }
            Some("garbled") => vec![json!("not json {"), reply(req, json!("after garbage"))],
            _ => vec![reply(req, json!("ok"))],
        });
        let qmp = QmpClient::connect(&path).unwrap();
        let err = qmp
            .execute_with_timeout("slow", Value::Null, Duration::from_millis(100))
            .unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        assert_eq!(qmp.execute("ok", Value::Null).unwrap(), json!("ok"));
        assert_eq!(
            qmp.execute("garbled", Value::Null).unwrap(),
            json!("after garbage")
        );
    }

    #[test]
    fn hmp_text_errors_and_odd_replies() {
        let (_dir, path, _server) = fake_qemu(|req| {
            match req["arguments"]["command-line"].as_str() {
                Some("info registers -a") => {
                    vec![
                        event("RESUME"),
                        reply(req, json!("RAX=1 \"quoted\"\r\nRBX=2\r\n")),
                    ]
                }
                Some("not text") => vec![reply(req, json!({ "no": "string" }))],
                Some("neither") => vec![json!({ "id": req["id"] })],
                None => vec![reply(req, json!({}))],
                _ => vec![
                    json!({ "error": { "class": "CommandNotFound", "desc": "nope" }, "id": req["id"] }),
                ],
            }
        });
        let qmp = QmpClient::connect(&path).unwrap();
        assert_eq!(
            qmp.hmp("info registers -a").unwrap(),
            "RAX=1 \"quoted\"\r\nRBX=2\r\n"
        );
        // The event that came first was routed to the queue, not lost with the reply.
        assert_eq!(
            qmp.wait_event(Duration::from_secs(5)).map(|e| e.name),
            Some("RESUME".to_string())
        );
        let err = qmp.hmp("not text").unwrap_err();
        assert!(matches!(err, Error::Protocol { .. }), "{err}");
        let err = qmp.hmp("neither").unwrap_err();
        assert!(matches!(err, Error::Protocol { .. }), "{err}");
        let err = qmp.hmp("info nothing").unwrap_err();
        assert!(
            err.to_string().contains("info nothing") && err.to_string().contains("nope"),
            "{err}"
        );
    }

    #[test]
    fn the_end_of_the_connection_is_an_event_and_fails_commands() {
        // QEMU answers the capabilities negotiation, says it shuts down, and goes.
        let (_dir, path, server) =
            fake_qemu_serving(1, |req| vec![reply(req, json!({})), event("SHUTDOWN")]);
        let qmp = QmpClient::connect(&path).unwrap();
        server.join().unwrap();
        // Nobody waits: asking routes what arrived without blocking, and sees the end.
        assert!(qmp.is_closed());
        assert_eq!(qmp.try_recv_event().unwrap().name, "SHUTDOWN");
        let closed = qmp.wait_event(Duration::from_secs(5)).unwrap();
        assert!(closed.is_connection_closed());
        assert!(matches!(
            qmp.execute("query-status", Value::Null),
            Err(Error::Closed)
        ));
    }

    #[test]
    fn a_silent_socket_is_not_qmp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let _server = std::thread::spawn(move || {
            let conn = listener.accept();
            std::thread::sleep(Duration::from_millis(500));
            drop(conn);
        });
        let err = QmpClient::connect_with_timeout(&path, Duration::from_millis(100)).unwrap_err();
        assert!(err.to_string().contains("nothing within"), "{err}");
    }
}
