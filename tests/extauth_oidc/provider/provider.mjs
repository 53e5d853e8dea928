// A real, standards-conformant OpenID provider for Outrider's OIDC tests: panva's
// certified `oidc-provider`, configured here and nothing more. Only the login UI is
// ours (a plain HTML form an HTTP client can submit; consent is granted automatically).
//
//   node provider.mjs --port PORT --config CONFIG.json
//
// CONFIG.json: {"clients": [oidc-provider client metadata + optional "access_token_ttl"],
//               "accounts": {"alice": {"password": "...", "claims": {...}}}}
// Prints "READY <issuer>" on stdout once listening.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

const { values: args } = parseArgs({
  options: { port: { type: 'string' }, config: { type: 'string' } },
});
const port = Number(args.port);
const settings = JSON.parse(readFileSync(args.config, 'utf8'));
const issuer = `http://127.0.0.1:${port}`;

// Fresh signing keys per run: the relying party must fetch them from jwks_uri.
const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 });
const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' });
const jwks = {
  keys: [
    { ...rsa.privateKey.export({ format: 'jwk' }), kid: `rsa-${randomBytes(4).toString('hex')}`, use: 'sig', alg: 'RS256' },
    { ...ec.privateKey.export({ format: 'jwk' }), kid: `ec-${randomBytes(4).toString('hex')}`, use: 'sig', alg: 'ES256' },
  ],
};

const accessTtl = new Map(
  settings.clients.map((c) => [c.client_id, c.access_token_ttl ?? 3600]),
);
const clients = settings.clients.map(({ access_token_ttl: _ttl, ...meta }) => meta);
const accounts = settings.accounts;

const provider = new Provider(issuer, {
  clients,
  jwks,
  cookies: { keys: [randomBytes(32).toString('hex')] },
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'groups'],
  },
  // Put the requested claims into the ID token itself (the RP reads identity from it).
  conformIdTokenClaims: false,
  features: {
    devInteractions: { enabled: false },
    rpInitiatedLogout: { enabled: true },
    resourceIndicators: { enabled: false },
  },
  pkce: { required: () => true },
  issueRefreshToken: async (_ctx, client) => client.grantTypeAllowed('refresh_token'),
  ttl: {
    AccessToken: (_ctx, _token, client) => accessTtl.get(client.clientId) ?? 3600,
    IdToken: 3600,
    RefreshToken: 86400,
    AuthorizationCode: 60,
    Interaction: 600,
    Session: 3600,
    Grant: 86400,
  },
  async findAccount(_ctx, id) {
    const account = accounts[id];
    if (!account) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, ...account.claims };
      },
    };
  },
  interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
});

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

async function readForm(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

async function grantConsent(interaction) {
  const { prompt: { details }, params, session } = interaction;
  const grant = details.grantId
    ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  if (details.missingOIDCScope) grant.addOIDCScope(details.missingOIDCScope.join(' '));
  if (details.missingOIDCClaims) grant.addOIDCClaims(details.missingOIDCClaims);
  if (details.missingResourceScopes) {
    for (const [indicator, scopes] of Object.entries(details.missingResourceScopes)) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
  }
  const grantId = await grant.save();
  return details.grantId ? {} : { consent: { grantId } };
}

async function handleInteraction(req, res) {
  const url = new URL(req.url, issuer);
  const interaction = await provider.interactionDetails(req, res);
  const uid = escapeHtml(interaction.uid);
  if (req.method === 'GET' && interaction.prompt.name === 'login') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(`<!DOCTYPE html><html><body><h1>Sign in</h1>
<form method="post" action="/interaction/${uid}/login">
<input name="login"><input name="password" type="password"><button>Sign in</button>
</form></body></html>`);
    return;
  }
  if (req.method === 'GET' && interaction.prompt.name === 'consent') {
    await provider.interactionFinished(req, res, await grantConsent(interaction), {
      mergeWithLastSubmission: true,
    });
    return;
  }
  if (req.method === 'POST' && url.pathname.endsWith('/login')) {
    const form = await readForm(req);
    const account = accounts[form.get('login')];
    if (!account || account.password !== form.get('password')) {
      res.writeHead(401, { 'content-type': 'text/html; charset=utf-8' });
      res.end('<!DOCTYPE html><html><body>Invalid login</body></html>');
      return;
    }
    await provider.interactionFinished(req, res, { login: { accountId: form.get('login') } }, {
      mergeWithLastSubmission: false,
    });
    return;
  }
  res.writeHead(400, { 'content-type': 'text/plain' });
  res.end('unexpected interaction request');
}

const callback = provider.callback();
const server = http.createServer((req, res) => {
  // Key set fetches, counted by the tests (one JWKS client per provider in the service).
  if (req.url.split('?')[0] === '/jwks') process.stdout.write(`${req.method} /jwks\n`);
  if (req.url.startsWith('/interaction/')) {
    handleInteraction(req, res).catch((err) => {
      res.writeHead(500, { 'content-type': 'text/plain' });
      res.end(`interaction failed: ${err.message}`);
    });
    return;
  }
  callback(req, res);
});
server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`READY ${issuer}\n`);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => process.exit(0));
}
