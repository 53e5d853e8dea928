"""Lua scripts of EnvoyExtensionPolicies checked before Envoy gets them, as Envoy Gateway does.

Envoy Gateway validates each script (``internal/gatewayapi/luavalidator``) at the level
the GatewayClass's EnvoyProxy sets (``spec.lua.validationType``, or the older
``spec.luaValidation``):

- ``Strict`` (the default): the script is loaded and its ``envoy_on_request`` /
  ``envoy_on_response`` run once against a stand-in of Envoy's stream handle; an error
  (a syntax error, a call of a method Envoy's handle does not have, a global that does not
  exist in Envoy, such as ``json`` or ``envoy``) rejects the policy;
- ``InsecureSyntax``: the script is only compiled;
- ``Disabled``: nothing.

Below ``Strict`` Outrider still loads each script as Envoy does when it loads the
configuration — compiles it and runs its top level — because Envoy refuses the whole
configuration for one script that fails there (a syntax error, a ``require`` of a module
Envoy does not have): such a policy is rejected, saying so, where Envoy Gateway would pass
it on to an Envoy that refuses it.

The script runs in LuaJIT 2.1 (lupa), Envoy's Lua, in a sandbox: no ``io``, ``os``,
``require``, ``load*``/``dofile``, ``debug``, ``ffi`` or Python; with an instruction budget
(the JIT off, so the count hook fires) instead of Envoy Gateway's 5 s timeout. The stand-in
handle is Outrider's own, after Envoy's documented stream handle API
(``envoyproxy.io/docs/envoy/latest/configuration/http/http_filters/lua_filter``): header
lookups answer nil, bodies are empty, calls that would leave the proxy (``httpCall``) answer
an empty 200.
"""

from __future__ import annotations

from lupa import luajit21

#: a script's own top level plus one call of each entry point must finish within this
MAX_INSTRUCTIONS = 5_000_000

_SANDBOX = r"""
local budget = ...
jit.off()
local sethook, traceback = debug.sethook, debug.traceback
local safe = {
  assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs,
  pcall = pcall, select = select, tonumber = tonumber, tostring = tostring, type = type,
  unpack = unpack, xpcall = xpcall, rawequal = rawequal, rawget = rawget, rawset = rawset,
  setmetatable = setmetatable, getmetatable = getmetatable, print = function() end,
  string = string, table = table, math = math, coroutine = coroutine, bit = bit,
  collectgarbage = function() return 0 end,
  os = {time = os.time, clock = os.clock, date = os.date, difftime = os.difftime},
}
-- Envoy's LuaJIT has its standard modules and no others
local modules = {string = string, table = table, math = math, bit = bit, coroutine = coroutine}
safe.require = function(name)
  local m = modules[name]
  if m == nil then error("module '" .. tostring(name) .. "' not found", 2) end
  return m
end
safe._G = safe

-- Envoy's stream handle, as documented; every method exists, answers something plausible
local function object(methods)
  return setmetatable({}, {__index = methods})
end
local function noop() end
local buffer = object({
  length = function() return 0 end,
  getBytes = function() return "" end,
  setBytes = function(_, s) return #tostring(s or "") end,
})
local function header_map()
  return setmetatable({}, {
    __index = {
      get = noop, getAtIndex = noop, getNumValues = function() return 0 end,
      add = noop, set = noop, replace = noop, remove = noop, setHttp1ReasonPhrase = noop,
    },
    __pairs = function() return function() return nil end, nil, nil end,
  })
end
local function metadata_map()
  return object({get = noop, set = noop, pairs = function() return function() end end})
end
local ssl = object({
  peerCertificatePresented = function() return false end,
  peerCertificateValidated = function() return false end,
  uriSanLocalCertificate = function() return {} end, sha256PeerCertificateDigest = noop,
  serialNumberPeerCertificate = noop, issuerPeerCertificate = noop,
  subjectPeerCertificate = noop, uriSanPeerCertificate = function() return {} end,
  subjectLocalCertificate = noop, dnsSansPeerCertificate = function() return {} end,
  dnsSansLocalCertificate = function() return {} end, validFromPeerCertificate = noop,
  expirationPeerCertificate = noop, sessionId = noop, ciphersuiteId = noop,
  ciphersuiteString = noop, urlEncodedPemEncodedPeerCertificate = noop,
  urlEncodedPemEncodedPeerCertificateChain = noop, tlsVersion = noop,
  parsedSubjectPeerCertificate = noop,
})
local connection = object({ssl = function() return ssl end})
local stream_info = object({
  protocol = function() return "HTTP/1.1" end,
  downstreamLocalAddress = function() return "127.0.0.1:80" end,
  downstreamRemoteAddress = function() return "127.0.0.1:12345" end,
  downstreamDirectRemoteAddress = function() return "127.0.0.1:12345" end,
  downstreamDirectLocalAddress = function() return "127.0.0.1:80" end,
  requestedServerName = function() return "" end,
  dynamicMetadata = function() return metadata_map() end,
  filterState = function() return object({get = noop}) end,
  downstreamSslConnection = function() return ssl end,
  routeName = function() return "" end, virtualClusterName = function() return "" end,
  drainConnectionUponCompletion = noop, setUpstreamOverrideHost = noop,
})
local function new_handle()
  local headers, trailers = header_map(), header_map()
  return object({
    headers = function() return headers end,
    body = function() return buffer end,
    bodyChunks = function() return function() return nil end end,
    trailers = function() return trailers end,
    metadata = function() return metadata_map() end,
    streamInfo = function() return stream_info end,
    connection = function() return connection end,
    connectionStreamInfo = function() return stream_info end,
    logTrace = noop, logDebug = noop, logInfo = noop, logWarn = noop, logErr = noop,
    logCritical = noop,
    httpCall = function() return header_map(), "" end,
    respond = noop,
    importPublicKey = function() return object({}) end,
    verifySignature = function() return true, nil end,
    base64Escape = function(_, s) return tostring(s or "") end,
    timestamp = function() return 0 end,
    timestampString = function() return "0" end,
    filterContext = function() return metadata_map() end,
    virtualHost = function() return object({metadata = function() return metadata_map() end}) end,
    route = function() return object({metadata = function() return metadata_map() end}) end,
    stats = function()
      local metric = object({inc = noop, dec = noop, add = noop, sub = noop, set = noop,
                             recordValue = noop, value = function() return 0 end})
      return object({counter = function() return metric end, gauge = function() return metric end,
                     histogram = function() return metric end})
    end,
    clearRouteCache = noop,
    setUpstreamOverrideHost = noop,
  })
end

return function(code, entry)
  local env = setmetatable({}, {__index = safe})
  local chunk, err = loadstring(code, "=lua")
  if not chunk then return "syntax", err end
  setfenv(chunk, env)
  sethook(function() error("the script runs too long", 2) end, "", budget)
  local ok, msg = xpcall(function()
    chunk()  -- what Envoy does when it loads the script
    if entry ~= nil then
      local fn = rawget(env, entry)
      if type(fn) ~= "function" then error(entry .. " is not a function", 0) end
      fn(new_handle())
    end
  end, traceback)
  sethook()
  if not ok then return "run", msg end
  return nil
end
"""


class LuaChecker:
    """One LuaJIT runtime for the translation: compiles and (Strict) runs scripts."""

    def __init__(self) -> None:
        self._runtime = luajit21.LuaRuntime(register_eval=False, register_builtins=False)
        self._check = self._runtime.execute(_SANDBOX, MAX_INSTRUCTIONS)

    def problem(self, code: str, level: str) -> str | None:
        """What is wrong with ``code`` at validation ``level``, or None."""
        entries: list[str | None] = [None]  # load it (compile, run its top level) as Envoy
        if level == "Strict":
            entries = [e for e in ("envoy_on_request", "envoy_on_response") if e in code]
            if not entries:
                return "expected one of envoy_on_request() or envoy_on_response() to be defined"
        for entry in entries:
            result = self._check(code, entry)
            kind, message = result if isinstance(result, tuple) else (result, None)
            if kind is None:
                continue
            # the error, without the traceback's frames inside this checker
            message = str(message).split("\nstack traceback:")[0]
            if kind == "syntax":
                return f"syntax error: {message}"
            return f"failed to validate with {entry}: {message}"
        return None
