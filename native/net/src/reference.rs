//! The bare transport, measured: one QUIC connection on loopback between two endpoints
//! built exactly as the carrier builds its own (TLS 1.3 with raw ed25519 keys, the same
//! transport parameters, windows, UDP socket buffers, GSO/GRO), each on its own
//! single-threaded runtime and thread as a node's carrier is, streaming length-prefixed
//! frames as links do. No BEAM, no identity exchange, no flow control towards a VM.
//!
//! `make bench` prints this as its "raw quinn" column: what the transport can do on this
//! machine, the ceiling the carrier's own figures are read against.

use crate::congestion::LaneSharing;
use crate::{bind_socket, tls, transport_config, Role, Settings, RECEIVE_WINDOW};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use trust_dist_proto::frame;
use trust_dist_proto::SecretKey;

/// What one run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// One-way throughput of back-to-back messages of each size, in MB/s (10^6 bytes).
    pub throughput: Vec<(usize, f64)>,
    /// Round trips of a 64-byte message, in microseconds.
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    pub rtt_samples: usize,
}

/// Measures throughput for each message size (the median of `runs` runs of `seconds`
/// each) and `round_trips` small round trips, each test on a fresh connection.
pub fn measure(
    sizes: &[usize],
    seconds: f64,
    runs: usize,
    round_trips: usize,
) -> Result<Report, String> {
    let settings = Settings::default();
    let mut throughput = Vec::new();
    for &size in sizes {
        let mut rates = Vec::new();
        for _ in 0..runs.max(1) {
            let (server, client) = pair(&settings)?;
            rates.push(stream_for(server, client, size, seconds)?);
        }
        rates.sort_by(f64::total_cmp);
        throughput.push((size, rates[(rates.len() - 1) / 2]));
    }
    let (server, client) = pair(&settings)?;
    let mut rtts = round_trips_on(server, client, round_trips)?;
    rtts.sort_by(f64::total_cmp);
    let at = |q: f64| rtts[((rtts.len() as f64 - 1.0) * q).round() as usize];
    Ok(Report {
        throughput,
        rtt_p50_us: at(0.50),
        rtt_p99_us: at(0.99),
        rtt_samples: rtts.len(),
    })
}

/// A node's side of the measurement: a runtime on its own thread and an endpoint on it.
struct Side {
    runtime: tokio::runtime::Runtime,
    endpoint: quinn::Endpoint,
    client: Option<quinn::ClientConfig>,
}

fn side(settings: &Settings, server: bool) -> Result<Side, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let secret = SecretKey::generate();
    let addr: SocketAddr = ([127, 0, 0, 1], 0).into();
    let (socket, _) = bind_socket(addr, settings.socket_buffer).map_err(|e| e.to_string())?;
    let server_config = if server {
        let crypto = tls::server_config(&secret).map_err(|e| e.to_string())?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(Arc::new(transport_config(
            settings,
            Role::Server,
            Arc::new(LaneSharing::new()),
        )));
        Some(config)
    } else {
        None
    };
    let endpoint = {
        let _guard = runtime.enter();
        quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            server_config,
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|e| e.to_string())?
    };
    let client = if server {
        None
    } else {
        let crypto = tls::client_config(&secret).map_err(|e| e.to_string())?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport_config(
            settings,
            Role::Client,
            Arc::new(LaneSharing::new()),
        )));
        Some(config)
    };
    Ok(Side {
        runtime,
        endpoint,
        client,
    })
}

fn pair(settings: &Settings) -> Result<(Side, Side), String> {
    Ok((side(settings, true)?, side(settings, false)?))
}

/// Runs `server` on its own thread and `client` on this one, as two nodes would.
fn run<S, C, T>(server: Side, client: Side, serve: S, drive: C) -> Result<T, String>
where
    S: FnOnce(quinn::Connection) -> futures_lite::BoxedServe + Send + 'static,
    C: FnOnce(quinn::Connection) -> futures_lite::BoxedDrive<T>,
{
    let addr = server.endpoint.local_addr().map_err(|e| e.to_string())?;
    let server_thread = std::thread::spawn(move || {
        let Side {
            runtime, endpoint, ..
        } = server;
        runtime.block_on(async move {
            let incoming = endpoint.accept().await.ok_or("endpoint closed")?;
            let connection = incoming.await.map_err(|e| e.to_string())?;
            // As the carrier does once the peer is verified.
            connection.set_receive_window(quinn::VarInt::from_u32(RECEIVE_WINDOW));
            serve(connection).await?;
            endpoint.wait_idle().await;
            Ok::<(), String>(())
        })
    });
    let Side {
        runtime,
        endpoint,
        client,
    } = client;
    let config = client.ok_or("the client side has no client configuration")?;
    let result = runtime.block_on(async move {
        let connection = endpoint
            .connect_with(config, addr, "trust-dist")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let out = drive(connection.clone()).await;
        connection.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        out
    });
    let served = server_thread
        .join()
        .map_err(|_| "server thread panicked".to_string())?;
    served?;
    result
}

/// Back-to-back `size`-byte frames for `seconds`; MB/s as the receiver counted them
/// (from its first byte to the end of the stream).
fn stream_for(server: Side, client: Side, size: usize, seconds: f64) -> Result<f64, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    run(
        server,
        client,
        move |connection| {
            Box::pin(async move {
                let (_send, mut recv) = connection.accept_bi().await.map_err(|e| e.to_string())?;
                let mut bytes = 0u64;
                let mut first = None;
                while let Some(chunk) = recv
                    .read_chunk(256 * 1024, true)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    first.get_or_insert_with(Instant::now);
                    bytes += chunk.bytes.len() as u64;
                }
                let elapsed = first.map_or(Duration::ZERO, |t| t.elapsed());
                let _ = tx.send((bytes, elapsed));
                Ok(())
            })
        },
        move |connection| {
            Box::pin(async move {
                let (mut send, _recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
                let mut message = frame::header(size as u32).to_vec();
                message.resize(frame::HEADER_BYTES + size, 0x5a);
                let message = bytes::Bytes::from(message);
                let deadline = Instant::now() + Duration::from_secs_f64(seconds);
                while Instant::now() < deadline {
                    send.write_chunk(message.clone())
                        .await
                        .map_err(|e| e.to_string())?;
                }
                send.finish().map_err(|e| e.to_string())?;
                send.stopped().await.map_err(|e| e.to_string())?;
                Ok(())
            })
        },
    )?;
    let (bytes, elapsed) = rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| "the receiver reported nothing".to_string())?;
    Ok(bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9))
}

/// `n` round trips of a 64-byte frame; each sample in microseconds.
fn round_trips_on(server: Side, client: Side, n: usize) -> Result<Vec<f64>, String> {
    const SMALL: usize = 64;
    run(
        server,
        client,
        move |connection| {
            Box::pin(async move {
                let (mut send, mut recv) =
                    connection.accept_bi().await.map_err(|e| e.to_string())?;
                let mut buf = [0u8; frame::HEADER_BYTES + SMALL];
                for _ in 0..n {
                    recv.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
                    send.write_all(&buf).await.map_err(|e| e.to_string())?;
                }
                send.finish().map_err(|e| e.to_string())?;
                let _ = send.stopped().await;
                Ok(())
            })
        },
        move |connection| {
            Box::pin(async move {
                let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
                let mut message = frame::header(SMALL as u32).to_vec();
                message.resize(frame::HEADER_BYTES + SMALL, 0x5a);
                let mut back = vec![0u8; message.len()];
                let mut samples = Vec::with_capacity(n);
                for _ in 0..n {
                    let t = Instant::now();
                    send.write_all(&message).await.map_err(|e| e.to_string())?;
                    recv.read_exact(&mut back)
                        .await
                        .map_err(|e| e.to_string())?;
                    samples.push(t.elapsed().as_secs_f64() * 1e6);
                }
                Ok(samples)
            })
        },
    )
}

/// Boxed futures for the two halves of a measurement (the server's runs on another
/// thread, so it is `Send`).
mod futures_lite {
    use std::future::Future;
    use std::pin::Pin;
    pub type BoxedServe = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
    pub type BoxedDrive<T> = Pin<Box<dyn Future<Output = Result<T, String>>>>;
}

#[cfg(test)]
mod tests {
    #[test]
    fn measures_a_short_run() {
        let report = super::measure(&[64 * 1024], 0.2, 1, 200).expect("runs");
        assert_eq!(report.throughput.len(), 1);
        assert!(report.throughput[0].1 > 1.0, "{report:?}");
        assert_eq!(report.rtt_samples, 200);
        assert!(report.rtt_p50_us > 0.0 && report.rtt_p50_us <= report.rtt_p99_us);
    }
}
