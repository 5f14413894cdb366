#!/usr/bin/env python3
"""Throwaway WKD/HKP/VKS server for scripts/wkd-testbed-selfcheck.sh ONLY.

It proves the test bed (names, port 443, trust store, the clients' requests) before kst serves
these paths; it is not a stand-in for kst in kst's tests. Serves files from ROOT:
  ROOT/<domain>/hu/<hash>            binary key (both WKD methods)
  ROOT/<domain>/policy, submission-address
  ROOT/hkp/<lowercase search>        armored key for op=get (search as the client sent it)
  ROOT/hkp-index/<lowercase search>  machine-readable index for op=index
KST_SELFCHECK_CTYPE, when set, is the Content-Type of every 200 answer.
Logs every request (method, request line, Host, all headers) as one JSON line to LOG.
Usage: server.py ROOT LOG TLS_ADDR TLS_PORT CERT KEY HKP_PORT
"""
import http.server, json, os, ssl, sys, threading, urllib.parse

ROOT, LOG, TLS_ADDR, TLS_PORT, CERT, KEY, HKP_PORT = sys.argv[1:8]
lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def record(self, status, ctype, method_name):
        with lock, open(LOG, "a") as f:
            f.write(json.dumps({
                "listener": self.server.name,
                "request_line": self.requestline,
                "headers": [[k, v] for k, v in self.headers.items()],
                "status": status, "content_type": ctype, "answered_as": method_name,
            }) + "\n")

    def send(self, status, body=b"", ctype="text/plain", what=""):
        self.record(status, ctype, what)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Access-Control-Allow-Origin", "*")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def file(self, path, ctype, what):
        real = os.path.realpath(path)
        if not real.startswith(os.path.realpath(ROOT) + os.sep) or not os.path.isfile(real):
            return self.send(404, b"not found\n", what=what + " 404")
        # KST_SELFCHECK_CTYPE overrides every 200's Content-Type (what do clients check?).
        ctype = os.environ.get("KST_SELFCHECK_CTYPE", ctype)
        with open(real, "rb") as f:
            self.send(200, f.read(), ctype, what)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        parts = url.path.split("/")
        if self.server.name == "hkp" or url.path.startswith("/pks/"):
            q = urllib.parse.parse_qs(url.query)
            op, search = q.get("op", [""])[0], q.get("search", [""])[0].lower()
            if url.path == "/pks/lookup" and op == "get":
                return self.file(os.path.join(ROOT, "hkp", search), "application/pgp-keys", "hkp get")
            if url.path == "/pks/lookup" and op == "index":
                return self.file(os.path.join(ROOT, "hkp-index", search), "text/plain", "hkp index")
            return self.send(404, b"not found\n", what="hkp other")
        if url.path.startswith("/vks/v1/"):
            # by-email/<addr>, by-fingerprint/<FPR>, by-keyid/<ID>: same files as HKP op=get.
            kind, _, arg = url.path[len("/vks/v1/"):].partition("/")
            arg = urllib.parse.unquote(arg).lower()
            key = {"by-email": arg, "by-fingerprint": "0x" + arg, "by-keyid": "0x" + arg}.get(kind)
            if key is None:
                return self.send(404, b"not found\n", what="vks other")
            return self.file(os.path.join(ROOT, "hkp", key), "application/pgp-keys", "vks " + kind)
        # /.well-known/openpgpkey/<domain>/hu/<hash>  on openpgpkey.<domain>  (advanced)
        # /.well-known/openpgpkey/hu/<hash>           on <domain>             (direct)
        if url.path.startswith("/.well-known/openpgpkey/"):
            rest = parts[3:]
            if host.startswith("openpgpkey.") and len(rest) >= 2 and rest[0] == host[len("openpgpkey."):]:
                domain, tail, how = rest[0], rest[1:], "advanced"
            elif not host.startswith("openpgpkey."):
                domain, tail, how = host, rest, "direct"
            else:
                return self.send(404, b"not found\n", what="wkd bad path")
            ctype = "text/plain" if tail[0] in ("policy", "submission-address") else "application/octet-stream"
            return self.file(os.path.join(ROOT, domain, *tail), ctype, how + " " + tail[0])
        return self.send(404, b"not found\n", what="other")


def serve(addr, port, name, tls):
    srv = http.server.ThreadingHTTPServer((addr, int(port)), Handler)
    srv.name = name
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(CERT, KEY)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()


serve(TLS_ADDR, TLS_PORT, "web", True)
serve("127.0.0.1", HKP_PORT, "hkp", False)
print("ready", flush=True)
threading.Event().wait()
