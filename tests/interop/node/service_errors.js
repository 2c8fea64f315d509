// Interop, service side: what IoT Hub's own Node service client makes of the
// relay's error answers. The stream-creation request is the one
// service_echo.js sends (the device-streams preview's `initiateStream`), made
// through azure-iothub's RestApiClient, whose `translateError` turns an
// error answer into a typed error: it reads IoT Hub's classic
// `"Message": "ErrorCode:<Name>;<text>"` from the body, and a relay that sent
// only `{errorCode, message}` got a generic `Error: Not found` for every 404.
//
// Environment: IOTHUB_CONNECTION_STRING (HostName without a port: this
// client always dials 443), STREAMING_TARGET_DEVICE, NODE_EXTRA_CA_CERTS.
// Prints one JSON line for the error the client raised:
// {"name", "isDeviceNotFound", "isUnauthorized", "isThrottling", "message", "status", "body"},
// or {"name": null} when the call succeeded. The Rust test decides.
'use strict';

require('dns').setDefaultResultOrder('ipv4first');

const { ConnectionString, SharedAccessSignature } = require('azure-iothub');
const { RestApiClient } = require('azure-iothub/dist/common-http/rest_api_client');
const { anHourFromNow } = require('azure-iothub/dist/common-core/authorization');
const errors = require('azure-iothub/dist/common-core/errors');
const iothubPackage = require('azure-iothub/package.json');

const API_VERSION = '2018-10-20-preview';
const TIMEOUT_SECONDS = 1;

const connectionString = process.env.IOTHUB_CONNECTION_STRING;
const deviceId = process.env.STREAMING_TARGET_DEVICE;
if (!connectionString || !deviceId) {
  console.error('set IOTHUB_CONNECTION_STRING and STREAMING_TARGET_DEVICE');
  process.exit(2);
}
const deadline = setTimeout(() => {
  console.error('no answer within 20 s');
  process.exit(1);
}, 20000);

const parsed = ConnectionString.parse(connectionString);
const restApiClient = new RestApiClient(
  {
    host: parsed.HostName,
    keyName: parsed.SharedAccessKeyName,
    sharedAccessSignature: SharedAccessSignature.create(parsed.HostName, parsed.SharedAccessKeyName, parsed.SharedAccessKey, anHourFromNow()),
  },
  iothubPackage.name + '/' + iothubPackage.version
);

const path = '/twins/' + encodeURIComponent(deviceId) + '/streams/TestStream?api-version=' + API_VERSION;
const headers = {
  'iothub-streaming-connect-timeout-in-seconds': TIMEOUT_SECONDS,
  'iothub-streaming-response-timeout-in-seconds': TIMEOUT_SECONDS,
};

restApiClient.executeApiCall('POST', path, headers, null, (error) => {
  clearTimeout(deadline);
  if (!error) {
    console.log(JSON.stringify({ name: null }));
    process.exit(0);
  }
  console.log(
    JSON.stringify({
      name: error.name,
      isDeviceNotFound: error instanceof errors.DeviceNotFoundError,
      isUnauthorized: error instanceof errors.UnauthorizedError,
      isThrottling: error instanceof errors.ThrottlingError,
      message: error.message,
      status: error.response ? error.response.statusCode : null,
      body: error.responseBody ? String(error.responseBody) : null,
    })
  );
  process.exit(0);
});
