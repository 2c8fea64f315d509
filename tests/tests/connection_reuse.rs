//! What a client saves on each stream creation by coming back to the same
//! relay: the service client's REST call rides a keep-alive connection
//! (a stale one is replaced without the caller ever hearing of it), and a
//! TLS client resumes its session instead of a full handshake.
//!
//! The REST connections are counted by a TCP forwarder in front of the
//! relay, which can also cut a connection the moment a request arrives on
//! it, as a relay closing an idle connection does.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use devstreams_tests::Relay;
use framing::transport::NetworkStream;
use framing::{ConnectionString, DeviceClient, DeviceOptions, ServiceClient, StreamOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Counts the TCP connections made through it to the relay; when told to,
/// drops the next connection that sends anything, before forwarding it.
struct CountingForwarder {
    port: u16,
    accepted: Arc<AtomicUsize>,
    cut_next_request: Arc<AtomicBool>,
    _task: tokio::task::JoinHandle<()>,
}

impl CountingForwarder {
    async fn start(target: &str) -> CountingForwarder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let cut_next_request = Arc::new(AtomicBool::new(false));
        let target = target.to_string();
        let (counter, cut) = (accepted.clone(), cut_next_request.clone());
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let (target, cut) = (target.clone(), cut.clone());
                connections.spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(&target).await {
                        forward(inbound, outbound, cut).await;
                    }
                });
            }
        });
        CountingForwarder {
            port,
            accepted,
            cut_next_request,
            _task: task,
        }
    }

    fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Copies both ways until either side ends; client bytes that arrive
/// while `cut` is set end the connection instead (the flag is cleared).
async fn forward(inbound: TcpStream, outbound: TcpStream, cut: Arc<AtomicBool>) {
    let (mut client_read, mut client_write) = inbound.into_split();
    let (mut relay_read, mut relay_write) = outbound.into_split();
    let to_relay = async {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            let read = match client_read.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => read,
            };
            if cut.swap(false, Ordering::SeqCst) {
                return;
            }
            if relay_write.write_all(&buffer[..read]).await.is_err() {
                return;
            }
        }
    };
    let to_client = async {
        let _ = tokio::io::copy(&mut relay_read, &mut client_write).await;
    };
    tokio::select! {
        _ = to_relay => {}
        _ = to_client => {}
    }
}

/// A device with this connection string that accepts every stream request
/// until dropped.
async fn accepting_device_with(
    relay: &Relay,
    connection_string: &str,
) -> tokio::task::JoinHandle<()> {
    let mut device = DeviceClient::connect(
        &ConnectionString::parse_device(connection_string).expect("device string"),
        &relay.tls(),
        &DeviceOptions::default(),
    )
    .await
    .expect("the device connects");
    let responder = device.responder();
    tokio::spawn(async move {
        while let Ok(request) = device.next_request().await {
            let _ = responder.accept(&request).await;
        }
    })
}

/// A device that accepts every stream request until dropped.
async fn accepting_device(relay: &Relay, device_id: &str) -> tokio::task::JoinHandle<()> {
    let connection_string = relay.add_device(device_id).await;
    accepting_device_with(relay, &connection_string).await
}

fn options() -> StreamOptions {
    StreamOptions {
        connect_timeout: Duration::from_secs(5),
        response_timeout: Duration::from_secs(5),
        ..StreamOptions::default()
    }
}

/// A service client whose REST calls go through a counting forwarder, once
/// the device "MyDevice" is online.
async fn service_through_forwarder(relay: &Relay) -> (CountingForwarder, ServiceClient) {
    let forwarder = CountingForwarder::start(&relay.address).await;
    let service = ServiceClient::new(
        ConnectionString::parse_service(&devstreams_tests::through_port(
            &relay.service_connection_string,
            forwarder.port,
        ))
        .expect("service string"),
        relay.tls(),
    );
    devstreams_tests::wait_until_connected(&service, "MyDevice").await;
    (forwarder, service)
}

async fn accepted(service: &ServiceClient, device_id: &str) {
    let invitation = service
        .create_stream(device_id, "TestStream", &options())
        .await
        .expect("the stream is created");
    assert!(invitation.is_accepted, "the device accepts every stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_stream_creations_reuse_few_rest_connections() {
    let relay = Relay::start(&[]).await;
    let _device = accepting_device(&relay, "MyDevice").await;
    let (forwarder, service) = service_through_forwarder(&relay).await;
    let before = forwarder.connections();
    assert!(
        before >= 1,
        "the readiness probe went through the forwarder"
    );
    for _ in 0..20 {
        accepted(&service, "MyDevice").await;
    }
    assert_eq!(
        forwarder.connections(),
        before,
        "twenty creations one after another ride the probe's connection"
    );
    // Eight at a time, over and over: at most one connection per creation
    // in flight, kept between the rounds.
    for _ in 0..5 {
        let round: Vec<_> = (0..8)
            .map(|_| {
                let service = service.clone();
                tokio::spawn(async move { accepted(&service, "MyDevice").await })
            })
            .collect();
        for creation in round {
            creation.await.expect("the creation task ends");
        }
    }
    let opened = forwarder.connections() - before;
    assert!(
        opened <= 8,
        "40 creations, 8 at a time, opened {opened} new connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_cut_as_the_request_goes_out_is_retried_on_a_fresh_one() {
    let relay = Relay::start(&[]).await;
    let _device = accepting_device(&relay, "MyDevice").await;
    let (forwarder, service) = service_through_forwarder(&relay).await;
    let before = forwarder.connections();
    // The pooled connection looks alive to the client, and is dropped as
    // soon as the request's first bytes reach the forwarder.
    forwarder.cut_next_request.store(true, Ordering::SeqCst);
    accepted(&service, "MyDevice").await;
    assert!(
        !forwarder.cut_next_request.load(Ordering::SeqCst),
        "the request went out on the pooled connection first"
    );
    assert_eq!(
        forwarder.connections(),
        before + 1,
        "the call was sent again on one fresh connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restart_leaves_no_stale_connection_to_report() {
    let relay = Relay::start(&[]).await;
    let service_string = relay.service_connection_string.clone();
    let tls = relay.tls();
    let _device = accepting_device(&relay, "MyDevice").await;
    let service = ServiceClient::new(
        ConnectionString::parse_service(&service_string).expect("service string"),
        tls,
    );
    devstreams_tests::wait_until_connected(&service, "MyDevice").await;
    let relay = relay.restart().await;
    let _device = accepting_device_again(&relay, "MyDevice").await;
    devstreams_tests::wait_until_connected(&service, "MyDevice").await;
    accepted(&service, "MyDevice").await;
}

/// [`accepting_device`] for a device the relay already knows (its data dir
/// survived a restart).
async fn accepting_device_again(relay: &Relay, device_id: &str) -> tokio::task::JoinHandle<()> {
    let shown = relay.cli(&["device", "show", device_id]).await;
    let connection_string = String::from_utf8_lossy(&shown.stdout)
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("HostName="))
        .expect("`relay device show` prints the connection string")
        .to_string();
    accepting_device_with(relay, &connection_string).await
}

/// Dials the relay's main port with `tls` and says how the handshake went.
async fn handshake_kind(relay: &Relay, tls: &Arc<rustls::ClientConfig>) -> rustls::HandshakeKind {
    let stream =
        framing::transport::connect("localhost", relay.port(), Some(tls), Duration::from_secs(5))
            .await
            .expect("TLS to the relay");
    let NetworkStream::Tls(mut stream) = stream else {
        panic!("a TLS dial gives a TLS stream");
    };
    // Tickets come after the handshake: a request and its answer make sure
    // they were read before the connection closes.
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("request sent");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    let (_, connection) = stream.get_ref();
    connection
        .handshake_kind()
        .expect("the handshake is complete")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_coming_back_resumes_its_tls_session_and_a_new_trust_setting_does_not() {
    let relay = Relay::start(&[]).await;
    let tls = relay.tls();
    assert_eq!(
        handshake_kind(&relay, &tls).await,
        rustls::HandshakeKind::Full
    );
    for _ in 0..3 {
        assert_eq!(
            handshake_kind(&relay, &tls).await,
            rustls::HandshakeKind::Resumed,
            "the same configuration comes back"
        );
    }
    // Another trust setting is another configuration: it proves the
    // certificate again rather than riding the first one's session.
    let other = relay.tls();
    assert_eq!(
        handshake_kind(&relay, &other).await,
        rustls::HandshakeKind::Full
    );
}
