//! A tiny authoritative DNS server on a loopback UDP port, for discovery tests: it answers A and
//! SRV questions from tables the test changes while it runs, with a TTL it sets, and counts the
//! questions it was asked. It can also fail every question (SERVFAIL) or stop answering.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

const TYPE_A: u16 = 1;
const TYPE_SRV: u16 = 33;
const RCODE_SERVFAIL: u16 = 2;
const RCODE_NXDOMAIN: u16 = 3;

/// How the server treats questions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// From its tables: NXDOMAIN for an unknown name, no answers for a known name without
    /// records of the type asked.
    Answer,
    /// SERVFAIL to everything.
    ServFail,
    /// No answer at all (the resolver times out).
    Silent,
}

/// One SRV record.
#[derive(Debug, Clone)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    pub target: String,
}

#[derive(Debug)]
struct Zone {
    a: HashMap<String, Vec<Ipv4Addr>>,
    srv: HashMap<String, Vec<Srv>>,
    ttl: u32,
    mode: Mode,
    /// Questions asked, by lower-cased name without the final dot.
    asked: HashMap<String, usize>,
}

/// The running server; stopped when dropped.
pub struct TestDns {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    task: JoinHandle<()>,
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl TestDns {
    /// Starts it on 127.0.0.1 with a free port, with empty tables and a TTL of 0.
    pub async fn start() -> TestDns {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let zone = Arc::new(Mutex::new(Zone {
            a: HashMap::new(),
            srv: HashMap::new(),
            ttl: 0,
            mode: Mode::Answer,
            asked: HashMap::new(),
        }));
        let shared = Arc::clone(&zone);
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let reply = {
                    let mut zone = shared.lock().unwrap();
                    answer(&mut zone, &buf[..n])
                };
                if let Some(reply) = reply {
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
        });
        TestDns { addr, zone, task }
    }

    /// Sets the A records of `name` (an empty list: the name exists with no A records).
    pub fn set_a(&self, name: &str, ips: &[Ipv4Addr]) {
        self.zone.lock().unwrap().a.insert(key(name), ips.to_vec());
    }

    /// Forgets `name` (A and SRV): it answers NXDOMAIN.
    pub fn remove(&self, name: &str) {
        let mut zone = self.zone.lock().unwrap();
        zone.a.remove(&key(name));
        zone.srv.remove(&key(name));
    }

    /// Sets the SRV records of `name`.
    pub fn set_srv(&self, name: &str, records: &[Srv]) {
        self.zone
            .lock()
            .unwrap()
            .srv
            .insert(key(name), records.to_vec());
    }

    /// Sets the TTL of every record it gives from now on.
    pub fn set_ttl(&self, ttl: u32) {
        self.zone.lock().unwrap().ttl = ttl;
    }

    /// Sets how it treats questions.
    pub fn set_mode(&self, mode: Mode) {
        self.zone.lock().unwrap().mode = mode;
    }

    /// How many questions about `name` it was asked.
    pub fn asked(&self, name: &str) -> usize {
        self.zone
            .lock()
            .unwrap()
            .asked
            .get(&key(name))
            .copied()
            .unwrap_or(0)
    }
}

/// The reply to one query, or `None` to stay silent (or for a packet that is not a query).
fn answer(zone: &mut Zone, query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let flags = u16::from_be_bytes([query[2], query[3]]);
    let questions = u16::from_be_bytes([query[4], query[5]]);
    if flags & 0x8000 != 0 || questions != 1 {
        return None;
    }
    // The question: labels, then type and class.
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).into_owned());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question_end = at + 4;
    let question = query.get(12..question_end)?;
    let name = key(&labels.join("."));
    *zone.asked.entry(name.clone()).or_default() += 1;

    let mut records: Vec<(u16, Vec<u8>)> = Vec::new();
    let rcode = match zone.mode {
        Mode::Silent => return None,
        Mode::ServFail => RCODE_SERVFAIL,
        Mode::Answer => {
            let known = zone.a.contains_key(&name) || zone.srv.contains_key(&name);
            if !known {
                RCODE_NXDOMAIN
            } else {
                match qtype {
                    TYPE_A => {
                        for ip in zone.a.get(&name).into_iter().flatten() {
                            records.push((TYPE_A, ip.octets().to_vec()));
                        }
                    }
                    TYPE_SRV => {
                        for srv in zone.srv.get(&name).into_iter().flatten() {
                            let mut data = Vec::new();
                            data.extend_from_slice(&srv.priority.to_be_bytes());
                            data.extend_from_slice(&srv.weight.to_be_bytes());
                            data.extend_from_slice(&srv.port.to_be_bytes());
                            data.extend_from_slice(&encode_name(&srv.target));
                            records.push((TYPE_SRV, data));
                        }
                    }
                    // AAAA and the rest: the name exists, with no such records.
                    _ => {}
                }
                0
            }
        }
    };

    let mut reply = Vec::with_capacity(512);
    reply.extend_from_slice(&query[0..2]);
    // QR, the query's opcode and RD, AA, RA, and the response code.
    let reply_flags = 0x8000 | (flags & 0x7900) | 0x0400 | 0x0080 | rcode;
    reply.extend_from_slice(&reply_flags.to_be_bytes());
    reply.extend_from_slice(&1u16.to_be_bytes());
    reply.extend_from_slice(&(records.len() as u16).to_be_bytes());
    reply.extend_from_slice(&0u16.to_be_bytes());
    reply.extend_from_slice(&0u16.to_be_bytes());
    reply.extend_from_slice(question);
    for (rtype, data) in records {
        // The owner name: a pointer to the question's name, at offset 12.
        reply.extend_from_slice(&0xc00cu16.to_be_bytes());
        reply.extend_from_slice(&rtype.to_be_bytes());
        reply.extend_from_slice(&1u16.to_be_bytes());
        reply.extend_from_slice(&zone.ttl.to_be_bytes());
        reply.extend_from_slice(&(data.len() as u16).to_be_bytes());
        reply.extend_from_slice(&data);
    }
    Some(reply)
}

fn encode_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.trim_end_matches('.').split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}
