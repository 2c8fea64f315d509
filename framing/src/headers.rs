//! HTTP header names and error codes of the stream-creation call. IoT Hub
//! clients compare them byte for byte, so they are written once, lowercase.

pub const CONNECT_TIMEOUT: &str = "iothub-streaming-connect-timeout-in-seconds";
pub const RESPONSE_TIMEOUT: &str = "iothub-streaming-response-timeout-in-seconds";
pub const IS_ACCEPTED: &str = "iothub-streaming-is-accepted";
pub const URL: &str = "iothub-streaming-url";
pub const AUTH_TOKEN: &str = "iothub-streaming-auth-token";
/// devstreams: the `HOST:PORT` or `PORT` the service wants on the device.
pub const TARGET: &str = "x-devstreams-target";
/// devstreams: request (and, in the answer, confirmation) of half-close.
pub const HALF_CLOSE: &str = "x-devstreams-half-close";
/// devstreams: request of a resumable session (`new` or `continue`); in the
/// answer, `True` when the device agreed. Also sent by our proxies on the
/// stream's WebSocket upgrade, so a draining relay can tell them to move.
pub const RESUME: &str = "x-devstreams-resume";
/// The api-version our clients send; the relay accepts any.
pub const API_VERSION: &str = "2021-04-12";
/// IoT Hub's error code for "device is not online".
pub const ERROR_DEVICE_NOT_ONLINE: i64 = 404103;
