/*
 * gw_proxy.h - proxy routes: one client request passed to one backend and
 * its response streamed back.
 */
#ifndef GW_PROXY_H
#define GW_PROXY_H

#include "gw_core.h"
#include "gw_http.h"

/*
 * Starts proxying the request of c for the proxy route m->route (m, the
 * router's match, is borrowed for the call: its path parameters feed the
 * backend's hash_key). Answers at once with an error when no connection
 * can be had; otherwise the answer comes from upstream callbacks (see
 * gw_conn.h, async handlers).
 */
void gw_proxy_start(gw_conn_t *c, const gw_match_t *m);

/*
 * Writes the upstream request target for the normalized path of req, minus
 * strip leading segments, each segment percent-encoded again (an encoded
 * "/" stays "%2F"), plus the raw query. Returns the length, or 0 when it
 * does not fit in cap.
 */
size_t gw_proxy_target(const gw_req_t *req, size_t strip, char *out, size_t cap);

/*
 * Appends the headers every request gatherd sends upstream carries about its
 * client: X-Forwarded-For (the peer's address, after the list the peer
 * sent when it is a trusted proxy: nginx's $proxy_add_x_forwarded_for),
 * X-Forwarded-Proto, X-Forwarded-Host (when the client sent Host), Via
 * (the client's list plus "1.1 gatherd") and X-Request-Id, each line ending
 * in CRLF, to the growable buffer *buf of *len bytes and capacity *cap
 * (gw_grow rules; kept NUL-terminated). Aggregate calls use it too.
 */
void gw_proxy_add_forwarding(gw_conn_t *c, char **buf, size_t *len, size_t *cap);

/*
 * Appends the response head lines passed to the client for the n backend
 * header fields hdrs (offsets into base, values checked by gw_resp): every
 * field but the hop-by-hop ones, those a Connection field names, and those
 * gatherd writes itself (Date, Server, Content-Length, X-Request-Id), as
 * "Name: value\r\n", to the growable buffer *out (gw_grow rules; kept
 * NUL-terminated).
 */
void gw_proxy_response_head(const char *base, const gw_header_t *hdrs, size_t n, char **out, size_t *len,
                            size_t *cap);

/* Frees the proxy contexts worker w keeps for reuse (worker stop). */
void gw_proxy_worker_free(gw_worker_t *w);

#endif
