// Interop, service side: IoT Hub's own published Node client code against a
// devstreams relay. The stream is created with azure-iothub's RestApiClient
// exactly as the device-streams preview's `Client.initiateStream` did (same
// path, api-version and timeout headers, same reading of the answer), and
// the data goes through `websocket-stream` with `Authorization: Bearer`, as
// the preview's samples did. The device side is `echo-sample device`.
//
// Environment: IOTHUB_CONNECTION_STRING (HostName without a port: this
// client always dials 443), STREAMING_TARGET_DEVICE, NODE_EXTRA_CA_CERTS
// (the relay's certificate). Prints the quickstart's lines; exits 0 only
// after every message came back unchanged, message for message.
'use strict';

// The relay listens on 127.0.0.1; `localhost` may resolve to ::1 first.
require('dns').setDefaultResultOrder('ipv4first');

const { ConnectionString, SharedAccessSignature } = require('azure-iothub');
const { RestApiClient } = require('azure-iothub/dist/common-http/rest_api_client');
const { anHourFromNow } = require('azure-iothub/dist/common-core/authorization');
const iothubPackage = require('azure-iothub/package.json');
const websocket = require('websocket-stream');

const STREAM_NAME = 'TestStream';
const API_VERSION = '2018-10-20-preview';
const TIMEOUT_SECONDS = 30;
const MESSAGES = ['Streaming data over a stream...', 'a second message, echoed on its own'];

function fail(message) {
  console.error('interop failed: ' + message);
  process.exit(1);
}

const deadline = setTimeout(() => fail('no verified echo within ' + TIMEOUT_SECONDS + ' s'), TIMEOUT_SECONDS * 1000);

const connectionString = process.env.IOTHUB_CONNECTION_STRING;
const deviceId = process.env.STREAMING_TARGET_DEVICE;
if (!connectionString || !deviceId) {
  fail('set IOTHUB_CONNECTION_STRING and STREAMING_TARGET_DEVICE');
}

// What azure-iothub's Client.fromConnectionString gives its RestApiClient.
const parsed = ConnectionString.parse(connectionString);
const restApiClient = new RestApiClient(
  {
    host: parsed.HostName,
    keyName: parsed.SharedAccessKeyName,
    sharedAccessSignature: SharedAccessSignature.create(parsed.HostName, parsed.SharedAccessKeyName, parsed.SharedAccessKey, anHourFromNow()),
  },
  iothubPackage.name + '/' + iothubPackage.version
);

// The preview's initiateStream request.
const path = '/twins/' + encodeURIComponent(deviceId) + '/streams/' + encodeURIComponent(STREAM_NAME) + '?api-version=' + API_VERSION;
const headers = {
  'iothub-streaming-connect-timeout-in-seconds': TIMEOUT_SECONDS,
  'iothub-streaming-response-timeout-in-seconds': TIMEOUT_SECONDS,
};

restApiClient.executeApiCall('POST', path, headers, null, (error, _result, response) => {
  if (error) {
    fail('stream creation: ' + error.message);
  }
  const streamInfo = {
    authorizationToken: response.headers['iothub-streaming-auth-token'],
    uri: response.headers['iothub-streaming-url'],
    isAccepted: response.headers['iothub-streaming-is-accepted'] === 'True',
  };
  console.log('Stream response received: Name=' + STREAM_NAME + ' IsAccepted=' + (streamInfo.isAccepted ? 'True' : 'False'));
  if (!streamInfo.isAccepted) {
    fail('the device rejected the stream');
  }
  echo(streamInfo);
});

function echo(streamInfo) {
  const stream = websocket(streamInfo.uri, { headers: { Authorization: 'Bearer ' + streamInfo.authorizationToken } });
  stream.on('error', (error) => fail('stream: ' + error.message));
  let index = 0;
  let received = Buffer.alloc(0);
  const sendNext = () => {
    stream.write(Buffer.from(MESSAGES[index]));
    console.log('Sent stream data: ' + MESSAGES[index]);
  };
  stream.on('data', (data) => {
    received = Buffer.concat([received, data]);
    const expected = Buffer.from(MESSAGES[index]);
    if (received.length < expected.length) {
      return;
    }
    if (!received.equals(expected)) {
      fail('echo differs: sent ' + JSON.stringify(MESSAGES[index]) + ', got ' + JSON.stringify(received.toString()));
    }
    console.log('Received stream data: ' + received.toString());
    received = Buffer.alloc(0);
    index += 1;
    if (index < MESSAGES.length) {
      sendNext();
    } else {
      clearTimeout(deadline);
      stream.end();
      stream.on('close', () => process.exit(0));
      setTimeout(() => process.exit(0), 2000).unref();
    }
  });
  stream.once('connect', sendNext);
}
