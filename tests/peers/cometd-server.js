'use strict';
// Starts the official CometD NodeJS server (long-polling only) for the cometd-bridge tests.
//
//   node cometd-server.js '<json options>'
//
// Options (all optional):
//   host         listen address, default "127.0.0.1"
//   port         listen port, default 0 (any free port)
//   timeout      milliseconds a /meta/connect is held, default 30000
//   maxInterval  milliseconds before a silent session expires, default 10000
//   ack          true to enable the server-side ack extension
//   connectLog   a file that gets a line (the time in milliseconds) for every /meta/connect
//                the server receives: how often the client polls, seen from the server
//
// The server answers under /cometd. Prints "LISTENING <port>" on stdout once it accepts
// connections; exits on SIGTERM/SIGINT.
const http = require('http');
const cometd = require('cometd-nodejs-server');

const options = JSON.parse(process.argv[2] || '{}');
const host = options.host || '127.0.0.1';

const serverOptions = {};
if (options.timeout !== undefined) serverOptions.timeout = options.timeout;
if (options.maxInterval !== undefined) serverOptions.maxInterval = options.maxInterval;
const cometdServer = cometd.createCometDServer(serverOptions);
if (options.ack) {
  cometdServer.addExtension(new (require('cometd-nodejs-server/ack-extension').AcknowledgedMessagesExtension)());
}

if (options.connectLog) {
  const fs = require('fs');
  cometdServer.addExtension({
    incoming: (cometd, session, message, callback) => {
      if (message.channel === '/meta/connect') fs.appendFileSync(options.connectLog, `${Date.now()}\n`);
      callback(undefined, true);
    },
  });
}

const server = http.createServer((request, response) => {
  if (request.url === '/cometd' || request.url.startsWith('/cometd/')) {
    cometdServer.handle(request, response);
  } else {
    response.writeHead(404, { 'Content-Type': 'text/plain' });
    response.end('not found');
  }
});
// Held connects last up to `timeout`; keep Node's own request timeout well above it.
server.requestTimeout = 0;
server.on('error', (error) => {
  console.error(`cometd-server: ${error.message}`);
  process.exit(1);
});
server.listen(options.port || 0, host, () => {
  console.log(`LISTENING ${server.address().port}`);
});

const stop = () => server.close(() => process.exit(0)) && setTimeout(() => process.exit(0), 200).unref();
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
