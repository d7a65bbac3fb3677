//! A synchronous QMP client.
//!
//! QEMU interleaves asynchronous events with command replies on the same stream, so one reader
//! thread owns the receiving half: replies go to the caller waiting for that `id`, events go to a
//! queue the owner polls. Callers use `&self` from any thread; the connection is shared.

use crate::error::{shorten, Error, Result};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
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

type Reply = Result<Value>;

#[derive(Default)]
struct State {
    pending: HashMap<u64, SyncSender<Reply>>,
    events: VecDeque<QmpEvent>,
    dropped_events: u64,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    event_ready: Condvar,
    /// Bumped on every RESUME and RESET event; see [`QmpClient::generation`].
    generation: AtomicU64,
}

impl Shared {
    /// The state is plain data with no invariant a panicking holder could break half-way, so a
    /// poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push_event(&self, event: QmpEvent) {
        if matches!(event.name.as_str(), "RESUME" | "RESET") {
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
        let mut st = self.lock();
        if st.events.len() >= EVENT_QUEUE_LIMIT {
            st.events.pop_front();
            st.dropped_events = st.dropped_events.saturating_add(1);
        }
        st.events.push_back(event);
        drop(st);
        self.event_ready.notify_all();
    }

    fn close(&self) {
        let mut st = self.lock();
        if st.closed {
            return;
        }
        st.closed = true;
        for (_, tx) in st.pending.drain() {
            // The waiter may have given up already; nothing to do then.
            let _ = tx.try_send(Err(Error::Closed));
        }
        drop(st);
        self.push_event(QmpEvent {
            name: QmpEvent::CONNECTION_CLOSED.to_string(),
            data: Value::Null,
            timestamp_us: None,
        });
    }
}

/// Reads newline-terminated messages, keeping any bytes past the newline for the next call.
struct LineReader {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl LineReader {
    /// The next line without its terminator; `Ok(None)` at end of stream. A read timeout set on
    /// the stream surfaces as `WouldBlock`/`TimedOut` with the partial line still buffered.
    fn next_line(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                return Ok(Some(line));
            }
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A connection to QEMU's QMP monitor.
///
/// All methods take `&self`; a mutex serialises writes and the reader thread demultiplexes replies,
/// so one connection can serve memory-layout queries, register reads and pause/resume from
/// several threads.
pub struct QmpClient {
    path: PathBuf,
    writer: Mutex<UnixStream>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    timeout_ms: AtomicU64,
    greeting: Value,
    peer_pid: Option<u32>,
    reader: Option<JoinHandle<()>>,
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
        let mut reader = LineReader {
            stream: read_half,
            buf: Vec::new(),
        };
        let greeting = read_greeting(&mut reader, &path, greeting_timeout)?;
        reader
            .stream
            .set_read_timeout(None)
            .map_err(|e| Error::io("configuring the QMP socket", e))?;

        let shared = Arc::new(Shared::default());
        let thread_shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || reader_loop(reader, &thread_shared))
            .map_err(|e| Error::io("starting the QMP reader thread", e))?;

        let client = Self {
            path,
            writer: Mutex::new(stream),
            shared,
            next_id: AtomicU64::new(1),
            timeout_ms: AtomicU64::new(millis(DEFAULT_COMMAND_TIMEOUT)),
            greeting,
            peer_pid,
            reader: Some(handle),
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
        let timeout = Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed));
        self.execute_with_timeout(command, arguments, timeout)
    }

    /// [`QmpClient::execute`] with an explicit reply timeout (e.g. for a long memory dump).
    pub fn execute_with_timeout(
        &self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');

        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut st = self.shared.lock();
            if st.closed {
                return Err(Error::Closed);
            }
            st.pending.insert(id, tx);
        }
        let write_result = {
            let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            w.write_all(line.as_bytes())
        };
        if let Err(e) = write_result {
            self.shared.lock().pending.remove(&id);
            return Err(match e.kind() {
                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::NotConnected => {
                    Error::Closed
                }
                _ => Error::io(format!("sending `{command}` to QEMU"), e),
            });
        }

        let label = || {
            if command == "human-monitor-command" {
                msg.get("arguments")
                    .and_then(|a| a.get("command-line"))
                    .and_then(Value::as_str)
                    .unwrap_or(command)
                    .to_string()
            } else {
                command.to_string()
            }
        };
        match rx.recv_timeout(timeout) {
            Ok(Ok(reply)) => {
                if let Some(ret) = reply.get("return") {
                    Ok(ret.clone())
                } else if let Some(err) = reply.get("error") {
                    Err(Error::CommandFailed {
                        command: label(),
                        class: err
                            .get("class")
                            .and_then(Value::as_str)
                            .unwrap_or("UnknownClass")
                            .to_string(),
                        desc: err
                            .get("desc")
                            .and_then(Value::as_str)
                            .unwrap_or("(no description)")
                            .to_string(),
                    })
                } else {
                    Err(Error::protocol("QMP reply", reply.to_string()))
                }
            }
            Ok(Err(e)) => Err(e),
            Err(RecvTimeoutError::Timeout) => {
                self.shared.lock().pending.remove(&id);
                Err(Error::Timeout {
                    command: label(),
                    secs: timeout.as_secs(),
                })
            }
            Err(RecvTimeoutError::Disconnected) => Err(Error::Closed),
        }
    }

    /// Run an HMP command through `human-monitor-command` and return its text output.
    pub fn hmp(&self, command_line: &str) -> Result<String> {
        let out = self.execute(
            "human-monitor-command",
            json!({ "command-line": command_line }),
        )?;
        out.as_str()
            .map(str::to_string)
            .ok_or_else(|| Error::protocol("human-monitor-command reply", out.to_string()))
    }

    /// Take the oldest queued event, if any.
    pub fn try_recv_event(&self) -> Option<QmpEvent> {
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
        let deadline = Instant::now().checked_add(timeout);
        let mut st = self.shared.lock();
        loop {
            if let Some(pos) = st.events.iter().position(&want) {
                return st.events.remove(pos);
            }
            let left = match deadline {
                Some(d) => d.checked_duration_since(Instant::now())?,
                None => Duration::from_secs(3600),
            };
            if left.is_zero() {
                return None;
            }
            st = self
                .shared
                .event_ready
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Take every queued event.
    pub fn events(&self) -> Vec<QmpEvent> {
        self.shared.lock().events.drain(..).collect()
    }

    /// Events discarded because the queue was full (see [`EVENT_QUEUE_LIMIT`]).
    pub fn dropped_events(&self) -> u64 {
        self.shared.lock().dropped_events
    }

    /// A counter bumped on every `RESUME` and `RESET` event. A cache of guest translations taken
    /// while paused is valid as long as this value has not changed.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::SeqCst)
    }

    /// Bump the generation counter, for callers that know the guest changed without an event.
    pub fn bump_generation(&self) {
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether QEMU has closed the connection.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        if let Ok(w) = self.writer.lock() {
            // Unblocks the reader thread; the error (already closed) does not matter here.
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
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
    reader
        .stream
        .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .map_err(|e| Error::io("configuring the QMP socket", e))?;
    match reader.next_line() {
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

fn reader_loop(mut reader: LineReader, shared: &Shared) {
    // Any read error ends the connection just like EOF: either way no more replies can come.
    while let Ok(Some(line)) = reader.next_line() {
        let Ok(msg) = serde_json::from_slice::<Value>(&line) else {
            // QEMU only sends JSON objects; a garbled line cannot be routed, and dropping it
            // keeps the connection usable for everything else.
            continue;
        };
        if let Some(event) = QmpEvent::from_message(&msg) {
            shared.push_event(event);
            continue;
        }
        let Some(id) = msg.get("id").and_then(Value::as_u64) else {
            continue;
        };
        let tx = shared.lock().pending.remove(&id);
        if let Some(tx) = tx {
            let _ = tx.try_send(Ok(msg));
        }
    }
    shared.close();
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
