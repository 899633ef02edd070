/*
 * gw_http.h - the downstream HTTP/1.x request parser (llhttp, plus the
 * checks llhttp leaves out) and the helpers that write response heads.
 *
 * Strictness: anything that could frame a request differently in another
 * server is rejected, never guessed: Content-Length with Transfer-Encoding,
 * duplicate Content-Length, bad chunk sizes (llhttp), bare LF and obsolete
 * line folding (our pre-scan of the header block), invalid characters in
 * header names and values, HTTP versions other than 1.0 and 1.1, a missing
 * or repeated Host in HTTP/1.1, a Host that is not host[:port] (ours), a
 * Content-Length gatherd cannot represent (above 2^63-1; ours). A chunked
 * body is checked a second time by our own framing checker (strict CRLF,
 * no obs-fold in trailers, bounded extensions, a chunk size over the body
 * limit refused before its data is read), and llhttp must end the body
 * exactly where it does. These checks do not depend on how llhttp was
 * compiled, so a system llhttp behaves the same.
 *
 * Request bodies: the caller says per request whether the body is kept in
 * req->body (counted against gw_budget_bodies), streamed through req->body
 * to a handler that drains it, or read and discarded (counted, limited,
 * never stored).
 */
#ifndef GW_HTTP_H
#define GW_HTTP_H

#include "gw_config.h"
#include "gw_core.h"
#include "gw_router.h"

#include <llhttp.h>

struct evbuffer;

typedef struct {
    uint32_t name_off, name_len, value_off, value_len;
} gw_header_t;

struct gw_req_s {
    int method;                 /* llhttp_method_t */
    unsigned char http_major, http_minor;
    bool keep_alive;            /* the client allows another request */
    bool expect_continue;
    bool has_body;
    bool chunked;               /* the body came chunked */
    int64_t content_length;     /* -1 when chunked, else the exact number of body bytes read
                                   (0 without a body; never above INT64_MAX: bigger is a 400) */
    char *hbuf;                 /* target and header bytes, back to back */
    size_t hlen, hcap;
    size_t url_off, url_len;
    size_t path_len;            /* raw path: hbuf + url_off (after a scheme://authority) */
    size_t path_off;
    size_t query_off, query_len; /* without "?"; query_len 0 when none */
    size_t host_off, host_len;  /* the request's host[:port] (absolute-form authority, else the
                                   Host value; checked): hbuf + host_off; host_len 0 when none */
    gw_header_t *headers;
    size_t nheaders, headers_cap;
    struct evbuffer *body;      /* owned; emptied between requests */
    size_t body_len;
    gw_path_t path;             /* normalized, for the router */
    char request_id[72];
    char client_ip[48];         /* gw_realip_get() cache; "" until computed */
    signed char peer_trust;     /* gw_realip_peer_trusted() cache; 0 until computed */
};

/* What happens to the body of the current request (gw_parser_set_body_mode). */
typedef enum {
    GW_BODY_KEEP,    /* appended to req->body, taken from gw_budget_bodies (503 past it) */
    GW_BODY_STREAM,  /* appended to req->body for a handler that drains it as it goes */
    GW_BODY_DISCARD  /* read, counted against the limit, and dropped */
} gw_body_mode_t;

/* Result of gw_parser_execute(). */
typedef enum {
    GW_PARSE_AGAIN,   /* everything consumed, more bytes needed */
    GW_PARSE_HEADERS, /* paused after the head of a request with a body */
    GW_PARSE_DONE,    /* a whole request is in p->req; parser paused */
    GW_PARSE_ERROR    /* p->status and p->reason say why; close after answering */
} gw_parse_result_t;

struct gw_parser_s {
    llhttp_t ll;
    gw_req_t *req;
    const gw_http_limits_t *limits;
    int status;          /* error status: 400, 413, 414, 431, 503, 505, ... */
    const char *reason;  /* static text */
    bool started;        /* some bytes of a request were seen */
    bool headers_done;
    bool paused_at_headers;
    bool in_field;
    uint32_t cur_off, cur_len;
    int nhost;
    size_t trailer_len;  /* trailer bytes seen (dropped, but limited) */
    size_t body_limit;   /* 413 above it; limits->max_body_bytes unless the route says otherwise */
    gw_body_mode_t body_mode;
    size_t body_held;    /* bytes of this request's body taken from gw_budget_bodies */
    /* chunked framing, checked beside llhttp (check_chunked in gw_http.c) */
    unsigned char ck_state;
    uint64_t ck_size;    /* the size of the chunk being declared, then its bytes still to come */
    uint64_t ck_total;   /* sizes declared so far */
    size_t ck_ext;       /* chunk extension bytes so far */
    unsigned ck_digits;  /* hex digits of the size being read */
    /* header-block pre-scan */
    bool scan_done;
    bool scan_line_start;
    bool scan_first_line;
    char scan_prev;
    unsigned char scan_spaces; /* in the request line */
};

/* Binds parser to req (both caller-owned) and limits (borrowed). */
void gw_parser_init(gw_parser_t *p, gw_req_t *req, const gw_http_limits_t *limits);
/* Frees what the parser and req hold (not the structs themselves), the
 * body's budget included. */
void gw_parser_free(gw_parser_t *p);

/*
 * Feeds data. *consumed says how many bytes were used (less than len when a
 * request ended or the parser paused). After GW_PARSE_DONE the request is
 * handled, then gw_parser_next() prepares the next one. GW_PARSE_HEADERS
 * comes after the head of every request that has a body: the caller routes
 * it, may change the body limit, writes 100 Continue when expected, and
 * calls gw_parser_resume(). Body bytes are appended to req->body; a caller
 * that streams the body drains it as it goes.
 */
gw_parse_result_t gw_parser_execute(gw_parser_t *p, const char *data, size_t len, size_t *consumed);
/* Body limit for the current request (reset to limits->max_body_bytes by
 * gw_parser_next()); SIZE_MAX for none. */
void gw_parser_set_body_limit(gw_parser_t *p, size_t limit);
/* What happens to the current request's body (reset to GW_BODY_KEEP by
 * gw_parser_next()); before gw_parser_resume(). */
void gw_parser_set_body_mode(gw_parser_t *p, gw_body_mode_t mode);
/* Continues after GW_PARSE_HEADERS. GW_ERR when the declared
 * Content-Length exceeds the body limit (status 413), or when a body to
 * keep does not fit gw_budget_bodies (status 503; a declared length is
 * taken from it at once, a chunked body as it arrives). */
int gw_parser_resume(gw_parser_t *p);
/* Empties req->body and gives its budget back; at the end of every
 * request (gw_parser_next() and gw_parser_free() do it too). Idempotent. */
void gw_parser_body_release(gw_parser_t *p);
void gw_parser_next(gw_parser_t *p);

/* Finds a request header (case-insensitive); *len set; NULL when absent. */
const char *gw_req_header(const gw_req_t *r, const char *name, size_t *len);

/* The request's host[:port] (see gw_req_t.host_off); *len set; NULL when
 * the request named none (HTTP/1.0 without Host). */
const char *gw_req_host(const gw_req_t *r, size_t *len);

/* Whether s[0..len) is host[:port] as RFC 3986 allows it in Host: a
 * reg-name (unreserved, sub-delims, %XX; not empty), an IPv4 address or an
 * [IPv6] literal, then optionally ":" and a port of 1-5 digits up to 65535. */
bool gw_http_host_valid(const char *s, size_t len);

/* Whether a request with method (llhttp number) may be sent again after a
 * connection broke before any response byte (RFC 9110 9.2.2): GET, HEAD,
 * PUT, DELETE, OPTIONS, TRACE. Proxy routes and aggregate calls retry on
 * this rule. */
bool gw_http_idempotent(int method);

/* Status line reason phrase ("Not Found"). */
const char *gw_http_status_text(int status);

/* "Sun, 06 Nov 1994 08:49:37 GMT" for now, cached per thread per second. */
const char *gw_http_date(void);

/* 32 random hex characters plus NUL into buf (per-thread PRNG). */
void gw_http_new_request_id(char buf[33]);

#endif
