/*
 * gw_conn.h - one client connection: reads requests with gw_parser, answers
 * them strictly in order (pipelined requests wait in the input buffer),
 * keeps the connection alive, enforces the timeouts, and closes it.
 *
 * Ownership: a connection belongs to the worker that accepted it and is
 * freed only by that worker's thread, and only at the end of the outermost
 * callback that decided it must go (never inside a chain that may still
 * touch it). The request being handled is embedded in the connection.
 */
#ifndef GW_CONN_H
#define GW_CONN_H

#include "gw_core.h"

#include <event2/util.h>
#include <sys/socket.h>

/* Takes over fd, a freshly accepted socket of worker w. */
void gw_conn_accept(gw_worker_t *w, evutil_socket_t fd, const struct sockaddr *sa, int salen);

/* Moves a connection between requests to its worker's current
 * configuration (after a reload); does nothing while a request is being
 * read or handled. Only from the top of an event callback: the previous
 * configuration may be freed here. */
void gw_conn_adopt_gen(gw_conn_t *c);

/* Graceful stop: closes the connection now when idle, else after its
 * current response. */
void gw_conn_shutdown(gw_conn_t *c);

/* Marks the connection closed, whatever it was doing; it is freed by the
 * next gw_conn_release(). */
void gw_conn_close(gw_conn_t *c);

/* Frees c if it was marked closed. Only at the end of an entry point (a
 * callback or the worker's stop), where nothing up the stack uses c. */
void gw_conn_release(gw_conn_t *c);

/* The access log record of the current request (gw_alog.h), for route
 * handlers to add the upstream time and failed calls; borrowed. */
struct gw_alog_rec_s *gw_conn_alog(gw_conn_t *c);

/* The next connection in the worker's list. */
gw_conn_t *gw_conn_next(gw_conn_t *c);

/* Closes w's oldest idle connection (one that has begun no request and
 * has nothing left to send: a keep-alive one between requests, or a new
 * one that sent nothing yet), as nginx does at its connection limit.
 * False when w has none. From the top of a callback of w only. */
bool gw_conn_drain_idle(gw_worker_t *w);

/*
 * For route handlers that answer later (gw_proxy). The handler calls
 * gw_conn_begin_async() from its start function; from then on the
 * connection is in its hands until gw_conn_error(), gw_conn_end_response()
 * or gw_conn_abort(). If the connection dies first (client gone, worker
 * stopping), cancel(ctx) is called exactly once and nothing else of the
 * handler is called after it; cancel must not call back into the
 * connection. Calls made from the handler's own callbacks (upstream
 * events, timers) must end that callback with gw_conn_release(c); calls
 * made from the start function must not.
 */
typedef struct {
    void (*cancel)(void *ctx);
    void (*drained)(void *ctx); /* the client took the output: more may be sent */
    /* Streamed request bodies only: bytes were appended to req->body, or
     * the body ended (gw_conn_body_done()). It moves bytes on and may call
     * gw_conn_body_pause(); it must not end the request. */
    void (*body)(void *ctx);
} gw_conn_async_t;

void gw_conn_begin_async(gw_conn_t *c, const gw_conn_async_t *ops, void *ctx);

/*
 * Streamed request bodies. A proxy route is started as soon as the request
 * head is read; its body then arrives in req->body piece by piece (the body
 * callback says when) and the handler drains it. gw_conn_body_done() is
 * true once the whole body was read (at once for a request without one).
 * gw_conn_body_pause(c, true) stops reading the client until it is called
 * with false: the handler's way to apply backpressure. A response that ends
 * before the body does closes the connection after it (the rest of the
 * body is read and discarded by the lingering close).
 */
bool gw_conn_body_done(gw_conn_t *c);
void gw_conn_body_pause(gw_conn_t *c, bool pause);
gw_req_t *gw_conn_req(gw_conn_t *c);
gw_worker_t *gw_conn_worker(gw_conn_t *c);
/* The configuration the current request runs on: borrowed, alive while the
 * request is (a thread pool job that outlives it takes a reference). */
gw_config_t *gw_conn_config(gw_conn_t *c);
/* The real client address of the current request (gw_realip_get():
 * the peer, or what a trusted proxy says), and whether the peer is a
 * trusted proxy. Cached per request. */
const char *gw_conn_client_ip(gw_conn_t *c);
bool gw_conn_peer_trusted(gw_conn_t *c);
/* The client's address without port ("127.0.0.1", "::1"). */
const char *gw_conn_peer_ip(gw_conn_t *c);

/* Answers with a JSON error {"error": {"code": code<extra>}}; extra is more
 * members (",\"backend\":\"users\"") or "". Ends the async part. */
void gw_conn_error(gw_conn_t *c, int status, const char *code, const char *extra);
/* The same with extra header lines ("Name: v\r\n"..., borrowed). */
void gw_conn_error_headers(gw_conn_t *c, int status, const char *code, const char *extra, const char *headers);

/* Starts a streamed response: our head plus headers (lines, borrowed).
 * content_length < 0: unknown, sent chunked to HTTP/1.1 clients and
 * close-delimited to HTTP/1.0 ones. */
void gw_conn_start_response(gw_conn_t *c, int status, const char *headers, size_t len, int64_t content_length);
/* Appends body bytes (framed as needed; dropped for HEAD). */
void gw_conn_body(gw_conn_t *c, const char *data, size_t len);
/* The same for data of gw_malloc(), which the connection takes over and
 * frees once sent: a large body is queued without being copied. */
void gw_conn_body_take(gw_conn_t *c, char *data, size_t len);
/* Sends what is queued. False when the client is behind: stop producing
 * until the drained callback. */
bool gw_conn_send(gw_conn_t *c);
/* The body is complete: ends the async part; the next request may follow. */
void gw_conn_end_response(gw_conn_t *c);
/* Takes back a started response of which no byte reached the client yet
 * (its head and body are still queued): true when done, and the handler
 * may then answer otherwise (gw_conn_error()); false when some of it was
 * written, so only gw_conn_abort() is left. */
bool gw_conn_take_back(gw_conn_t *c);
/* Gives up mid-response: the connection is closed so the client never
 * mistakes a cut body for a whole one. Ends the async part. */
void gw_conn_abort(gw_conn_t *c);

#endif
