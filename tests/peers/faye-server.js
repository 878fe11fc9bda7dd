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
//   oauth       a Salesforce-like token endpoint at POST /services/oauth2/token:
//               { "tokenFile": path (the token handed out, re-read on each request),
//                 "clientId", "clientSecret", "username", "password", "refreshToken",
//                 "jwtKeyOut": path where a fresh RSA private key (PKCS#8 PEM) is written,
//                 for the JWT bearer flow }
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

let jwtPublicKey = null;
if (options.oauth && options.oauth.jwtKeyOut) {
  const crypto = require('crypto');
  const pair = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  fs.writeFileSync(options.oauth.jwtKeyOut, pair.privateKey.export({ type: 'pkcs8', format: 'pem' }));
  jwtPublicKey = pair.publicKey;
}

// Checks a JWT bearer assertion: RS256, iss = client id, sub = username, not expired.
const validJwt = (assertion, oauth) => {
  const crypto = require('crypto');
  const parts = (assertion || '').split('.');
  if (parts.length !== 3 || !jwtPublicKey) return false;
  const header = JSON.parse(Buffer.from(parts[0], 'base64url').toString());
  const claims = JSON.parse(Buffer.from(parts[1], 'base64url').toString());
  const signed = crypto.verify('RSA-SHA256', Buffer.from(parts[0] + '.' + parts[1]), jwtPublicKey,
    Buffer.from(parts[2], 'base64url'));
  return signed && header.alg === 'RS256' && claims.iss === oauth.clientId && claims.sub === oauth.username
    && typeof claims.aud === 'string' && claims.exp * 1000 > Date.now();
};

const tokenEndpoint = (request, response, oauth) => {
  let body = '';
  request.on('data', (chunk) => { body += chunk; });
  request.on('end', () => {
    const form = new URLSearchParams(body);
    const client = form.get('client_id') === oauth.clientId;
    const secret = form.get('client_secret') === oauth.clientSecret;
    const granted = {
      password: client && secret && form.get('username') === oauth.username && form.get('password') === oauth.password,
      refresh_token: client && secret && form.get('refresh_token') === oauth.refreshToken,
      client_credentials: client && secret,
      'urn:ietf:params:oauth:grant-type:jwt-bearer': validJwt(form.get('assertion'), oauth),
    }[form.get('grant_type')];
    if (!granted) {
      response.writeHead(400, { 'Content-Type': 'application/json' });
      return response.end(JSON.stringify({ error: 'invalid_grant', error_description: 'authentication failure' }));
    }
    const address = server.address();
    response.writeHead(200, { 'Content-Type': 'application/json' });
    response.end(JSON.stringify({
      access_token: fs.readFileSync(oauth.tokenFile, 'utf8').trim(),
      instance_url: `${options.tls ? 'https' : 'http'}://127.0.0.1:${address.port}`,
      token_type: 'Bearer',
      issued_at: String(Date.now()),
    }));
  });
};

const handler = (request, response) => {
  if (options.oauth && request.method === 'POST' && request.url.startsWith('/services/oauth2/token')) {
    return tokenEndpoint(request, response, options.oauth);
  }
  notFound(request, response);
};
const server = options.tls
  ? https.createServer({ cert: fs.readFileSync(options.tls.cert), key: fs.readFileSync(options.tls.key) }, handler)
  : http.createServer(handler);
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
