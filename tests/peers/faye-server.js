'use strict';
// Starts a real faye Bayeux server for the cometd-bridge tests.
//
//   node faye-server.js '<json options>'
//
// Options (all optional):
//   host        listen address, default "127.0.0.1"
//   port        listen port, default 0 (any free port)
//   mount       default "/bayeux"
//   timeout     seconds a /meta/connect is held (faye's `timeout`), default 60
//   ping        seconds between websocket pings (faye's `ping`), default none
//   extensions  [{ "module": "<name in ./extensions or a path>", "options": {...} }]
//   tls         { "cert": "<PEM file>", "key": "<PEM file>" }: serve HTTPS and WSS
//
// Websocket and long-polling are both enabled. Prints "LISTENING <port>" on stdout once
// the server accepts connections; exits on SIGTERM/SIGINT.
const fs = require('fs');
const http = require('http');
const https = require('https');
const path = require('path');
const faye = require('faye');

const options = JSON.parse(process.argv[2] || '{}');
const host = options.host || '127.0.0.1';
const mount = options.mount || '/bayeux';

const adapterOptions = { mount, timeout: options.timeout === undefined ? 60 : options.timeout };
if (options.ping !== undefined) adapterOptions.ping = options.ping;
const bayeux = new faye.NodeAdapter(adapterOptions);

for (const spec of options.extensions || []) {
  const modulePath = spec.module.includes('/') ? path.resolve(spec.module)
    : path.join(__dirname, 'extensions', spec.module + '.js');
  const factory = require(modulePath);
  bayeux.addExtension(factory(spec.options || {}, bayeux));
}

const notFound = (request, response) => {
  response.writeHead(404, { 'Content-Type': 'text/plain' });
  response.end('not found');
};
const server = options.tls
  ? https.createServer({ cert: fs.readFileSync(options.tls.cert), key: fs.readFileSync(options.tls.key) }, notFound)
  : http.createServer(notFound);
bayeux.attach(server);

server.on('error', (error) => {
  console.error(`faye-server: ${error.message}`);
  process.exit(1);
});
server.listen(options.port || 0, host, () => {
  console.log(`LISTENING ${server.address().port}`);
});

const stop = () => server.close(() => process.exit(0)) && setTimeout(() => process.exit(0), 200).unref();
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
