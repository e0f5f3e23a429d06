//! Distribution packets: the header forms and every control message of OTP 25–29.
//!
//! Restricted links negotiate neither the atom cache nor fragments, so a peer's packet is
//! in the pass-through form: `112`, then the control term and the optional payload term,
//! each with its own version byte. That is the only form the VM writes, and the only one
//! it reads, on such a link; any other is refused.

use crate::etf::{self, Atom, EtfError, Pid, Reference, Term};

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("empty packet")]
    Empty,
    #[error("header form {0:?} is not allowed on this link (atom cache and fragments are not negotiated)")]
    HeaderForm(&'static str),
    #[error("unknown header byte {0}")]
    UnknownHeader(u8),
    #[error("control message: {0}")]
    Term(#[from] EtfError),
    #[error("control message is not a tuple starting with an operation number")]
    NotControl,
    #[error("unknown control operation {0}")]
    UnknownOp(i64),
    #[error("control operation {op} ({name}) is malformed: {why}")]
    Malformed {
        op: u8,
        name: &'static str,
        why: &'static str,
    },
    #[error("operation {0} carries a payload it should not have")]
    UnexpectedPayload(&'static str),
    #[error("operation {0} lacks its payload")]
    MissingPayload(&'static str),
    #[error("bytes after the payload")]
    TrailingBytes,
}

/// The control operations, numbered as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Op {
    Link = 1,
    Send = 2,
    Exit = 3,
    Unlink = 4,
    NodeLink = 5,
    RegSend = 6,
    GroupLeader = 7,
    Exit2 = 8,
    SendTt = 12,
    ExitTt = 13,
    RegSendTt = 16,
    Exit2Tt = 18,
    MonitorP = 19,
    DemonitorP = 20,
    MonitorPExit = 21,
    SendSender = 22,
    SendSenderTt = 23,
    PayloadExit = 24,
    PayloadExitTt = 25,
    PayloadExit2 = 26,
    PayloadExit2Tt = 27,
    PayloadMonitorPExit = 28,
    SpawnRequest = 29,
    SpawnRequestTt = 30,
    SpawnReply = 31,
    SpawnReplyTt = 32,
    AliasSend = 33,
    AliasSendTt = 34,
    UnlinkId = 35,
    UnlinkIdAck = 36,
    AltactSigSend = 37,
}

impl Op {
    pub const ALL: [Op; 31] = [
        Op::Link,
        Op::Send,
        Op::Exit,
        Op::Unlink,
        Op::NodeLink,
        Op::RegSend,
        Op::GroupLeader,
        Op::Exit2,
        Op::SendTt,
        Op::ExitTt,
        Op::RegSendTt,
        Op::Exit2Tt,
        Op::MonitorP,
        Op::DemonitorP,
        Op::MonitorPExit,
        Op::SendSender,
        Op::SendSenderTt,
        Op::PayloadExit,
        Op::PayloadExitTt,
        Op::PayloadExit2,
        Op::PayloadExit2Tt,
        Op::PayloadMonitorPExit,
        Op::SpawnRequest,
        Op::SpawnRequestTt,
        Op::SpawnReply,
        Op::SpawnReplyTt,
        Op::AliasSend,
        Op::AliasSendTt,
        Op::UnlinkId,
        Op::UnlinkIdAck,
        Op::AltactSigSend,
    ];

    pub fn from_code(code: i64) -> Option<Op> {
        Op::ALL.iter().copied().find(|op| *op as i64 == code)
    }

    /// The name used in counters and logs (the `DOP_` name, lower case).
    pub fn name(self) -> &'static str {
        match self {
            Op::Link => "link",
            Op::Send => "send",
            Op::Exit => "exit",
            Op::Unlink => "unlink",
            Op::NodeLink => "node_link",
            Op::RegSend => "reg_send",
            Op::GroupLeader => "group_leader",
            Op::Exit2 => "exit2",
            Op::SendTt => "send_tt",
            Op::ExitTt => "exit_tt",
            Op::RegSendTt => "reg_send_tt",
            Op::Exit2Tt => "exit2_tt",
            Op::MonitorP => "monitor_p",
            Op::DemonitorP => "demonitor_p",
            Op::MonitorPExit => "monitor_p_exit",
            Op::SendSender => "send_sender",
            Op::SendSenderTt => "send_sender_tt",
            Op::PayloadExit => "payload_exit",
            Op::PayloadExitTt => "payload_exit_tt",
            Op::PayloadExit2 => "payload_exit2",
            Op::PayloadExit2Tt => "payload_exit2_tt",
            Op::PayloadMonitorPExit => "payload_monitor_p_exit",
            Op::SpawnRequest => "spawn_request",
            Op::SpawnRequestTt => "spawn_request_tt",
            Op::SpawnReply => "spawn_reply",
            Op::SpawnReplyTt => "spawn_reply_tt",
            Op::AliasSend => "alias_send",
            Op::AliasSendTt => "alias_send_tt",
            Op::UnlinkId => "unlink_id",
            Op::UnlinkIdAck => "unlink_id_ack",
            Op::AltactSigSend => "altact_sig_send",
        }
    }

    /// Whether a payload term follows the control term.
    fn has_payload(self) -> bool {
        matches!(
            self,
            Op::Send
                | Op::RegSend
                | Op::SendTt
                | Op::RegSendTt
                | Op::SendSender
                | Op::SendSenderTt
                | Op::PayloadExit
                | Op::PayloadExitTt
                | Op::PayloadExit2
                | Op::PayloadExit2Tt
                | Op::PayloadMonitorPExit
                | Op::SpawnRequest
                | Op::SpawnRequestTt
                | Op::AliasSend
                | Op::AliasSendTt
                | Op::AltactSigSend
        )
    }
}

/// A process as a monitor names it: a pid, or a name registered on the pid's node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Proc<'a> {
    Pid(Pid<'a>),
    Name(Atom<'a>),
}

/// Where an `ALTACT_SIG_SEND` goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target<'a> {
    Pid(Pid<'a>),
    Alias(Reference<'a>),
    Name(Atom<'a>),
}

/// `ALTACT_SIG_SEND` flag bits (OTP 28+).
pub mod altact {
    pub const PRIO: u64 = 1;
    pub const TOKEN: u64 = 2;
    pub const ALIAS: u64 = 4;
    pub const NAME: u64 = 8;
    pub const EXIT: u64 = 16;
    pub const KNOWN: u64 = PRIO | TOKEN | ALIAS | NAME | EXIT;
}

/// A decoded control message. `_TT` variants decode to the same shape; the token is in
/// [`Packet::token`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Control<'a> {
    Link {
        from: Pid<'a>,
        to: Pid<'a>,
    },
    /// `SEND`: the sender is not named.
    Send {
        to: Pid<'a>,
    },
    /// `EXIT`, `EXIT_TT`, `PAYLOAD_EXIT`, `PAYLOAD_EXIT_TT`: a linked process ended.
    Exit {
        from: Pid<'a>,
        to: Pid<'a>,
    },
    /// The pre-OTP 26 unlink.
    Unlink {
        from: Pid<'a>,
        to: Pid<'a>,
    },
    NodeLink,
    RegSend {
        from: Pid<'a>,
        to: Atom<'a>,
    },
    GroupLeader {
        from: Pid<'a>,
        to: Pid<'a>,
    },
    /// `exit/2` from the peer (`EXIT2`, `PAYLOAD_EXIT2` and their `_TT` forms).
    Exit2 {
        from: Pid<'a>,
        to: Pid<'a>,
    },
    MonitorP {
        from: Pid<'a>,
        to: Proc<'a>,
        reference: Reference<'a>,
    },
    DemonitorP {
        from: Pid<'a>,
        to: Proc<'a>,
        reference: Reference<'a>,
    },
    /// `MONITOR_P_EXIT` and `PAYLOAD_MONITOR_P_EXIT`: a monitored process ended.
    MonitorPExit {
        from: Proc<'a>,
        to: Pid<'a>,
        reference: Reference<'a>,
    },
    SendSender {
        from: Pid<'a>,
        to: Pid<'a>,
    },
    SpawnRequest {
        req_id: Reference<'a>,
        from: Pid<'a>,
        group_leader: Pid<'a>,
        module: Atom<'a>,
        function: Atom<'a>,
        arity: u32,
        options: Term<'a>,
    },
    SpawnReply {
        req_id: Reference<'a>,
        to: Pid<'a>,
        flags: i64,
        /// The new process, or the error atom.
        result: Term<'a>,
    },
    AliasSend {
        from: Pid<'a>,
        alias: Reference<'a>,
    },
    UnlinkId {
        id: u64,
        from: Pid<'a>,
        to: Pid<'a>,
    },
    UnlinkIdAck {
        id: u64,
        from: Pid<'a>,
        to: Pid<'a>,
    },
    AltactSigSend {
        flags: u64,
        from: Pid<'a>,
        to: Target<'a>,
    },
}

/// One decoded packet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Packet<'a> {
    pub op: Op,
    pub control: Control<'a>,
    /// The sequential-trace token of a `_TT` operation.
    pub token: Option<Term<'a>>,
    /// The control term's bytes (no version byte).
    pub control_bytes: &'a [u8],
    /// The payload term's bytes (no version byte), for operations that carry one.
    pub payload: Option<&'a [u8]>,
}

/// The header forms a restricted link accepts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    /// `112`: each term carries its own version byte.
    PassThrough,
}

/// Strips the header, returning the bytes from the control term on.
fn header(packet: &[u8]) -> Result<(&[u8], Form), DecodeError> {
    let (&first, rest) = packet.split_first().ok_or(DecodeError::Empty)?;
    match first {
        112 => {
            let terms = rest
                .strip_prefix(&[etf::VERSION])
                .ok_or(EtfError::NoVersion)?;
            Ok((terms, Form::PassThrough))
        }
        etf::VERSION => match rest {
            // Without the atom cache and fragments the VM only ever writes the
            // pass-through form, and takes nothing else on such a link.
            [68, ..] => Err(DecodeError::HeaderForm("normal distribution header")),
            [69, ..] | [70, ..] => Err(DecodeError::HeaderForm("fragment")),
            [other, ..] => Err(DecodeError::UnknownHeader(*other)),
            [] => Err(DecodeError::Empty),
        },
        other => Err(DecodeError::UnknownHeader(other)),
    }
}

/// Most elements of any control tuple (`SPAWN_REQUEST_TT`).
const MAX_CONTROL_ELEMENTS: u32 = 7;

/// Decodes a packet's header, control message and the bounds of its payload. The
/// payload itself is not read here (see `etf::walk`), except that it must be exactly one
/// term.
pub fn decode(packet: &[u8]) -> Result<Packet<'_>, DecodeError> {
    let (terms, form) = header(packet)?;
    let (control, len) = Term::parse(terms)?;
    let (control_bytes, after) = terms.split_at(len);
    let payload = match (form, after) {
        (_, []) => None,
        (Form::PassThrough, after) => Some(
            after
                .strip_prefix(&[etf::VERSION])
                .ok_or(EtfError::NoVersion)?,
        ),
    };
    let tuple = control
        .as_tuple()
        .filter(|t| (1..=MAX_CONTROL_ELEMENTS).contains(&t.len()))
        .ok_or(DecodeError::NotControl)?;
    let items = tuple.iter().collect::<Result<Vec<_>, _>>()?;
    let code = match items.first() {
        Some(Term::Int(code)) => *code,
        _ => return Err(DecodeError::NotControl),
    };
    let op = Op::from_code(code).ok_or(DecodeError::UnknownOp(code))?;
    let (control, token) = control_message(op, Fields { op, items })?;
    match (op.has_payload(), payload) {
        (true, None) => return Err(DecodeError::MissingPayload(op.name())),
        (false, Some(_)) => return Err(DecodeError::UnexpectedPayload(op.name())),
        (true, Some(p)) => {
            if etf::skip(p)? != p.len() {
                return Err(DecodeError::TrailingBytes);
            }
        }
        (false, None) => {}
    }
    Ok(Packet {
        op,
        control,
        token,
        control_bytes,
        payload,
    })
}

/// Reads the elements of a control tuple by position, naming the operation in errors.
#[derive(Clone)]
struct Fields<'a> {
    op: Op,
    items: Vec<Term<'a>>,
}

impl<'a> Fields<'a> {
    fn arity(self, arities: &[u32]) -> Result<Self, DecodeError> {
        if !arities.contains(&(self.items.len() as u32)) {
            return Err(Self::bad(self.op, "wrong number of elements"));
        }
        Ok(self)
    }

    fn bad(op: Op, why: &'static str) -> DecodeError {
        DecodeError::Malformed {
            op: op as u8,
            name: op.name(),
            why,
        }
    }

    fn term(&self, i: usize) -> Result<Term<'a>, DecodeError> {
        self.items
            .get(i)
            .copied()
            .ok_or_else(|| Self::bad(self.op, "missing element"))
    }

    fn pid(&self, i: usize) -> Result<Pid<'a>, DecodeError> {
        self.term(i)?
            .as_pid()
            .ok_or_else(|| Self::bad(self.op, "pid expected"))
    }

    fn reference(&self, i: usize) -> Result<Reference<'a>, DecodeError> {
        self.term(i)?
            .as_ref()
            .ok_or_else(|| Self::bad(self.op, "reference expected"))
    }

    fn atom(&self, i: usize) -> Result<Atom<'a>, DecodeError> {
        self.term(i)?
            .as_atom()
            .ok_or_else(|| Self::bad(self.op, "atom expected"))
    }

    fn proc(&self, i: usize) -> Result<Proc<'a>, DecodeError> {
        match self.term(i)? {
            Term::Pid(p) => Ok(Proc::Pid(p)),
            Term::Atom(a) => Ok(Proc::Name(a)),
            _ => Err(Self::bad(self.op, "pid or name expected")),
        }
    }

    fn int(&self, i: usize) -> Result<u64, DecodeError> {
        match self.term(i)? {
            Term::Int(n) if n >= 0 => Ok(n as u64),
            Term::Big {
                negative: false,
                digits,
            } if digits.len() <= 8 => {
                // Little-endian digits.
                Ok(digits
                    .iter()
                    .rev()
                    .fold(0u64, |acc, &d| (acc << 8) | u64::from(d)))
            }
            _ => Err(Self::bad(self.op, "non-negative integer expected")),
        }
    }

    /// The unused slot of `SEND` and `REG_SEND`: `''` on every OTP version seen (once the
    /// cookie). Any atom is accepted (the scan checks that it exists); nothing else.
    fn unused(&self, i: usize) -> Result<(), DecodeError> {
        match self.term(i)? {
            Term::Atom(_) => Ok(()),
            _ => Err(Self::bad(self.op, "unused slot is not an atom")),
        }
    }
}

fn control_message(
    op: Op,
    fields: Fields<'_>,
) -> Result<(Control<'_>, Option<Term<'_>>), DecodeError> {
    use Control as C;
    let tuple_len = fields.items.len();
    let read = move |arities: &[u32]| fields.arity(arities);
    Ok(match op {
        Op::Link | Op::Unlink | Op::GroupLeader => {
            let f = read(&[3])?;
            let (from, to) = (f.pid(1)?, f.pid(2)?);
            let c = match op {
                Op::Link => C::Link { from, to },
                Op::Unlink => C::Unlink { from, to },
                _ => C::GroupLeader { from, to },
            };
            (c, None)
        }
        Op::Send | Op::SendTt => {
            let f = read(if op == Op::Send { &[3] } else { &[4] })?;
            f.unused(1)?;
            let token = (op == Op::SendTt).then(|| f.term(3)).transpose()?;
            (C::Send { to: f.pid(2)? }, token)
        }
        Op::Exit | Op::ExitTt | Op::Exit2 | Op::Exit2Tt => {
            // {Op, From, To, Reason} or {Op, From, To, Token, Reason}
            let tt = matches!(op, Op::ExitTt | Op::Exit2Tt);
            let f = read(if tt { &[5] } else { &[4] })?;
            let (from, to) = (f.pid(1)?, f.pid(2)?);
            let token = tt.then(|| f.term(3)).transpose()?;
            let c = if matches!(op, Op::Exit | Op::ExitTt) {
                C::Exit { from, to }
            } else {
                C::Exit2 { from, to }
            };
            (c, token)
        }
        Op::PayloadExit | Op::PayloadExitTt | Op::PayloadExit2 | Op::PayloadExit2Tt => {
            let tt = matches!(op, Op::PayloadExitTt | Op::PayloadExit2Tt);
            let f = read(if tt { &[4] } else { &[3] })?;
            let (from, to) = (f.pid(1)?, f.pid(2)?);
            let token = tt.then(|| f.term(3)).transpose()?;
            let c = if matches!(op, Op::PayloadExit | Op::PayloadExitTt) {
                C::Exit { from, to }
            } else {
                C::Exit2 { from, to }
            };
            (c, token)
        }
        Op::NodeLink => {
            read(&[1])?;
            (C::NodeLink, None)
        }
        Op::RegSend | Op::RegSendTt => {
            let f = read(if op == Op::RegSend { &[4] } else { &[5] })?;
            f.unused(2)?;
            let token = (op == Op::RegSendTt).then(|| f.term(4)).transpose()?;
            (
                C::RegSend {
                    from: f.pid(1)?,
                    to: f.atom(3)?,
                },
                token,
            )
        }
        Op::MonitorP | Op::DemonitorP => {
            let f = read(&[4])?;
            let (from, to, reference) = (f.pid(1)?, f.proc(2)?, f.reference(3)?);
            let c = if op == Op::MonitorP {
                C::MonitorP {
                    from,
                    to,
                    reference,
                }
            } else {
                C::DemonitorP {
                    from,
                    to,
                    reference,
                }
            };
            (c, None)
        }
        Op::MonitorPExit => {
            let f = read(&[5])?;
            (
                C::MonitorPExit {
                    from: f.proc(1)?,
                    to: f.pid(2)?,
                    reference: f.reference(3)?,
                },
                None,
            )
        }
        Op::PayloadMonitorPExit => {
            let f = read(&[4])?;
            (
                C::MonitorPExit {
                    from: f.proc(1)?,
                    to: f.pid(2)?,
                    reference: f.reference(3)?,
                },
                None,
            )
        }
        Op::SendSender | Op::SendSenderTt => {
            let f = read(if op == Op::SendSender { &[3] } else { &[4] })?;
            let token = (op == Op::SendSenderTt).then(|| f.term(3)).transpose()?;
            (
                C::SendSender {
                    from: f.pid(1)?,
                    to: f.pid(2)?,
                },
                token,
            )
        }
        Op::SpawnRequest | Op::SpawnRequestTt => {
            // {29, ReqId, From, GroupLeader, {M, F, Arity}, OptList[, Token]}
            let f = read(if op == Op::SpawnRequest { &[6] } else { &[7] })?;
            let mfa = f
                .term(4)?
                .as_tuple()
                .filter(|t| t.len() == 3)
                .ok_or_else(|| Fields::bad(op, "{Module, Function, Arity} expected"))?;
            let module = mfa.get(0)?.as_atom();
            let function = mfa.get(1)?.as_atom();
            let arity = match mfa.get(2)? {
                Term::Int(a) if (0..=255).contains(&a) => Some(a as u32),
                _ => None,
            };
            let (Some(module), Some(function), Some(arity)) = (module, function, arity) else {
                return Err(Fields::bad(op, "{Module, Function, Arity} expected"));
            };
            let options = f.term(5)?;
            if options.list_len().is_none() {
                return Err(Fields::bad(op, "option list expected"));
            }
            let token = (op == Op::SpawnRequestTt).then(|| f.term(6)).transpose()?;
            (
                C::SpawnRequest {
                    req_id: f.reference(1)?,
                    from: f.pid(2)?,
                    group_leader: f.pid(3)?,
                    module,
                    function,
                    arity,
                    options,
                },
                token,
            )
        }
        Op::SpawnReply | Op::SpawnReplyTt => {
            // {31, ReqId, To, Flags, Result[, Token]}
            let f = read(if op == Op::SpawnReply { &[5] } else { &[6] })?;
            let result = f.term(4)?;
            if !matches!(result, Term::Pid(_) | Term::Atom(_)) {
                return Err(Fields::bad(op, "result must be a pid or an error atom"));
            }
            let flags = f.int(3)? as i64;
            let token = (op == Op::SpawnReplyTt).then(|| f.term(5)).transpose()?;
            (
                C::SpawnReply {
                    req_id: f.reference(1)?,
                    to: f.pid(2)?,
                    flags,
                    result,
                },
                token,
            )
        }
        Op::AliasSend | Op::AliasSendTt => {
            let f = read(if op == Op::AliasSend { &[3] } else { &[4] })?;
            let token = (op == Op::AliasSendTt).then(|| f.term(3)).transpose()?;
            (
                C::AliasSend {
                    from: f.pid(1)?,
                    alias: f.reference(2)?,
                },
                token,
            )
        }
        Op::UnlinkId | Op::UnlinkIdAck => {
            let f = read(&[4])?;
            let (id, from, to) = (f.int(1)?, f.pid(2)?, f.pid(3)?);
            if id == 0 {
                return Err(Fields::bad(op, "unlink id 0"));
            }
            let c = if op == Op::UnlinkId {
                C::UnlinkId { id, from, to }
            } else {
                C::UnlinkIdAck { id, from, to }
            };
            (c, None)
        }
        Op::AltactSigSend => {
            // {37, Flags, SenderPid, To} or {37, Flags, SenderPid, To, Token}
            let f = read(&[4, 5])?;
            let flags = f.int(1)?;
            if flags & !altact::KNOWN != 0 {
                return Err(Fields::bad(op, "unknown flag bits"));
            }
            let with_token = flags & altact::TOKEN != 0;
            if with_token != (tuple_len == 5) {
                return Err(Fields::bad(op, "token flag and tuple size disagree"));
            }
            let to = match flags & (altact::ALIAS | altact::NAME) {
                0 => Target::Pid(f.pid(3)?),
                altact::ALIAS => Target::Alias(f.reference(3)?),
                altact::NAME => Target::Name(f.atom(3)?),
                _ => return Err(Fields::bad(op, "both alias and name flags")),
            };
            let token = with_token.then(|| f.term(4)).transpose()?;
            (
                C::AltactSigSend {
                    flags,
                    from: f.pid(2)?,
                    to,
                },
                token,
            )
        }
    })
}

/// Builds the packets the carrier sends in answer to refused requests, in the
/// pass-through form (restricted links negotiate no atom cache).
pub mod answer {
    use crate::etf::{encode, VERSION};

    /// A pass-through packet: `{Op, Elements...}`, then the payload if any (elements and
    /// payload already encoded, without version bytes).
    pub fn packet(op: u8, elements: &[&[u8]], payload: Option<&[u8]>) -> Vec<u8> {
        let size: usize =
            elements.iter().map(|e| e.len()).sum::<usize>() + payload.map_or(0, <[u8]>::len);
        let mut out = Vec::with_capacity(size + 8);
        out.extend_from_slice(&[112, VERSION]);
        encode::small_tuple(&mut out, elements.len().min(254) as u8 + 1);
        encode::small_int(&mut out, op);
        for e in elements.iter().take(254) {
            out.extend_from_slice(e);
        }
        if let Some(p) = payload {
            out.push(VERSION);
            out.extend_from_slice(p);
        }
        out
    }

    /// `{31, ReqId, To, 0, Error}`: the spawn request `req_id` of `to` failed.
    pub fn spawn_error(req_id_raw: &[u8], to_raw: &[u8], error: &str) -> Vec<u8> {
        let flags = [crate::etf::tag::SMALL_INTEGER, 0];
        packet(
            31,
            &[req_id_raw, to_raw, &flags, &encode::atom_term(error)],
            None,
        )
    }

    /// `{28, FromProc, To, Ref}` + Reason: the monitor `reference` of `to` on `from_raw`
    /// (a pid or a name, as the monitor named it) fired with `reason`.
    pub fn monitor_exit(
        from_raw: &[u8],
        to_raw: &[u8],
        reference_raw: &[u8],
        reason: &str,
    ) -> Vec<u8> {
        packet(
            28,
            &[from_raw, to_raw, reference_raw],
            Some(&encode::atom_term(reason)),
        )
    }

    /// `{24, From, To}` + Reason: the link between `from` (ours) and `to` is gone.
    pub fn link_exit(from_raw: &[u8], to_raw: &[u8], reason: &str) -> Vec<u8> {
        packet(24, &[from_raw, to_raw], Some(&encode::atom_term(reason)))
    }
}
