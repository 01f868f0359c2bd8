//! Connecting to a server inside a container's network namespace, from the host.
//!
//! Web endpoints are served inside the container: ASGI/WSGI apps by the runner on an
//! abstract unix socket, `web_server` apps on a TCP port of the container's loopback. Both
//! exist only in the container's network namespace, so nothing else (the host's network,
//! other containers) can reach them. The worker reaches them by creating its socket in that
//! namespace: a socket belongs to the namespace it was created in, for its whole life, so
//! a short-lived thread joins the namespace (`setns`), connects, and hands the connected
//! socket back; the calling thread's namespace never changes.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::path::Path;

/// What to connect to inside the namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NsTarget {
    /// An abstract unix socket (the name without the leading NUL; written `@name` elsewhere).
    Abstract(String),
    /// A TCP port on the namespace's loopback (127.0.0.1).
    Tcp(u16),
}

/// A connected socket, created in the target namespace.
#[derive(Debug)]
pub enum NsStream {
    Unix(UnixStream),
    Tcp(std::net::TcpStream),
}

/// Connects to `target` inside the network namespace at `netns` (`/proc/<pid>/ns/net` of a
/// process in it). Blocking: a unix or loopback connect answers at once.
pub fn connect_in_netns(netns: &Path, target: &NsTarget) -> io::Result<NsStream> {
    let ns = File::open(netns)?;
    let target = target.clone();
    std::thread::Builder::new()
        .name("flare-netns-connect".into())
        .spawn(move || -> io::Result<NsStream> {
            crate::sys::setns(&ns.as_fd().try_clone_to_owned()?, libc::CLONE_NEWNET)?;
            match target {
                NsTarget::Abstract(name) => {
                    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
                    Ok(NsStream::Unix(UnixStream::connect_addr(&addr)?))
                }
                NsTarget::Tcp(port) => {
                    let s = std::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port))?;
                    let _ = s.set_nodelay(true);
                    Ok(NsStream::Tcp(s))
                }
            }
        })?
        .join()
        .map_err(|_| io::Error::other("the namespace connect thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    /// A listener in a fresh network namespace is reachable through it, and only through it.
    #[test]
    fn connects_inside_the_namespace_only() {
        // SAFETY: geteuid has no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let name = format!("flare-netconnect-test-{}", std::process::id());
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let n = name.clone();
        let server = std::thread::spawn(move || {
            // SAFETY: unshare on this thread only; it exits when the test is done.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let addr = SocketAddr::from_abstract_name(n.as_bytes()).unwrap();
            let l = UnixListener::bind_addr(&addr).unwrap();
            // SAFETY: gettid has no arguments.
            let tid = unsafe { libc::syscall(libc::SYS_gettid) };
            tx.send(format!("/proc/{}/task/{tid}/ns/net", std::process::id())).unwrap();
            let (mut c, _) = l.accept().unwrap();
            let mut buf = [0u8; 4];
            c.read_exact(&mut buf).unwrap();
            c.write_all(&buf).unwrap();
            let _ = done_rx.recv();
        });
        let ns = rx.recv().unwrap();
        // From the host's namespace the name does not exist.
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        assert!(UnixStream::connect_addr(&addr).is_err());
        let NsStream::Unix(mut s) = connect_in_netns(Path::new(&ns), &NsTarget::Abstract(name)).unwrap()
        else {
            panic!("expected a unix stream")
        };
        s.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        done_tx.send(()).unwrap();
        server.join().unwrap();
        // A port nobody listens on in the namespace: refused, not a host port.
        assert!(connect_in_netns(Path::new("/proc/self/ns/net"), &NsTarget::Tcp(1)).is_err());
    }
}
