/*
 * gw_http.c - downstream request parsing on top of llhttp, and response
 * head helpers (see gw_http.h for the strictness rules).
 *
 * The target and header bytes of a request are copied into one growing
 * buffer (req->hbuf) as llhttp hands them over, possibly in pieces; headers
 * are recorded as offsets into it. Nothing is allocated per request once a
 * connection's buffers have grown to fit its requests.
 */
#include "gw_http.h"
#include "gw_budget.h"

#include <arpa/inet.h>
#include <event2/buffer.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>

#define PARSER(ll) ((gw_parser_t *)(ll)->data)

static int
set_error(gw_parser_t *p, int status, const char *reason)
{
    p->status = status;
    p->reason = reason;
    return HPE_USER;
}

static int
append(gw_parser_t *p, const char *at, size_t len)
{
    gw_req_t *r = p->req;
    gw_grow((void **)&r->hbuf, &r->hcap, r->hlen + len, 1);
    memcpy(r->hbuf + r->hlen, at, len);
    r->hlen += len;
    if (r->hlen - r->url_len > p->limits->max_header_bytes)
        return set_error(p, 431, "request headers too large");
    return 0;
}

static int
on_message_begin(llhttp_t *ll)
{
    PARSER(ll)->started = true;
    return 0;
}

static int
on_url(llhttp_t *ll, const char *at, size_t len)
{
    gw_parser_t *p = PARSER(ll);
    p->req->url_len += len;
    if (p->req->url_len > p->limits->max_url_bytes)
        return set_error(p, 414, "request URI too long");
    return append(p, at, len);
}

/*
 * Trailer fields (after a chunked body) arrive through the same callbacks
 * as headers. They are counted against max_header_bytes and dropped: a
 * trailer must never be taken for a header (it could forge
 * X-Forwarded-For or Host after the request was routed).
 */
static int
trailer_bytes(gw_parser_t *p, size_t len)
{
    p->trailer_len += len;
    if (p->trailer_len > p->limits->max_header_bytes)
        return set_error(p, 431, "request trailers too large");
    return 0;
}

static int
on_header_field(llhttp_t *ll, const char *at, size_t len)
{
    gw_parser_t *p = PARSER(ll);
    if (p->headers_done)
        return trailer_bytes(p, len);
    if (!p->in_field) {
        p->in_field = true;
        p->cur_off = (uint32_t)p->req->hlen;
        p->cur_len = 0;
    }
    p->cur_len += (uint32_t)len;
    return append(p, at, len);
}

static bool
is_tchar(unsigned char c)
{
    static const char extra[] = "!#$%&'*+-.^_`|~";
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c && memchr(extra, c, sizeof(extra) - 1) != NULL);
}

static int
on_header_field_complete(llhttp_t *ll)
{
    gw_parser_t *p = PARSER(ll);
    gw_req_t *r = p->req;
    if (p->headers_done)
        return 0;
    if (!p->in_field || p->cur_len == 0)
        return set_error(p, 400, "empty header name");
    for (uint32_t i = 0; i < p->cur_len; i++)
        if (!is_tchar((unsigned char)r->hbuf[p->cur_off + i]))
            return set_error(p, 400, "invalid character in header name");
    p->in_field = false;
    if (r->nheaders >= p->limits->max_headers)
        return set_error(p, 431, "too many request headers");
    gw_grow((void **)&r->headers, &r->headers_cap, r->nheaders + 1, sizeof(gw_header_t));
    gw_header_t *h = &r->headers[r->nheaders];
    h->name_off = p->cur_off;
    h->name_len = p->cur_len;
    h->value_off = (uint32_t)r->hlen;
    h->value_len = 0;
    return 0;
}

static int
on_header_value(llhttp_t *ll, const char *at, size_t len)
{
    gw_parser_t *p = PARSER(ll);
    if (p->headers_done)
        return trailer_bytes(p, len);
    p->req->headers[p->req->nheaders].value_len += (uint32_t)len;
    return append(p, at, len);
}

static bool
name_is(const gw_req_t *r, const gw_header_t *h, const char *name, size_t len)
{
    return h->name_len == len && strncasecmp(r->hbuf + h->name_off, name, len) == 0;
}

#define NAME_IS(r, h, lit) name_is(r, h, lit, sizeof(lit) - 1)

static int
on_header_value_complete(llhttp_t *ll)
{
    gw_parser_t *p = PARSER(ll);
    gw_req_t *r = p->req;
    if (p->headers_done)
        return 0;
    gw_header_t *h = &r->headers[r->nheaders];
    const unsigned char *v = (const unsigned char *)r->hbuf + h->value_off;
    for (uint32_t i = 0; i < h->value_len; i++)
        if ((v[i] < 0x20 && v[i] != '\t') || v[i] == 0x7f)
            return set_error(p, 400, "invalid character in header value");
    while (h->value_len > 0 && (v[h->value_len - 1] == ' ' || v[h->value_len - 1] == '\t'))
        h->value_len--;
    r->nheaders++;
    if (NAME_IS(r, h, "host"))
        p->nhost++;
    else if (NAME_IS(r, h, "expect")) {
        if (h->value_len == 12 && strncasecmp((const char *)v, "100-continue", 12) == 0)
            r->expect_continue = true;
        else
            return set_error(p, 417, "unsupported Expect value");
    }
    return 0;
}

static bool
id_char(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '-' || c == '_' ||
           c == '.' || c == ':' || c == '+' || c == '/' || c == '=';
}

/* A client's X-Request-Id is kept when it is short and plain, so it can
 * go into logs and upstream headers without escaping. */
static void
set_request_id(gw_req_t *r)
{
    size_t len;
    const char *id = gw_req_header(r, "x-request-id", &len);
    bool sane = id != NULL && len >= 1 && len < 64;
    for (size_t i = 0; sane && i < len; i++)
        sane = id_char((unsigned char)id[i]);
    if (sane) {
        memcpy(r->request_id, id, len);
        r->request_id[len] = '\0';
    } else {
        gw_http_new_request_id(r->request_id);
    }
}

static bool
hexdig(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* RFC 3986 unreserved and sub-delims: the bytes of a reg-name besides %XX. */
static bool
reg_name_char(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c && strchr("-._~!$&'()*+,;=", c) != NULL);
}

bool
gw_http_host_valid(const char *s, size_t len)
{
    size_t i = 0;
    if (len > 0 && s[0] == '[') {
        const char *rb = memchr(s, ']', len);
        size_t alen = rb ? (size_t)(rb - s) - 1 : 0;
        char tmp[INET6_ADDRSTRLEN];
        struct in6_addr a6;
        if (alen == 0 || alen >= sizeof(tmp))
            return false;
        memcpy(tmp, s + 1, alen);
        tmp[alen] = '\0';
        if (inet_pton(AF_INET6, tmp, &a6) != 1)
            return false;
        i = alen + 2;
    } else {
        /* an IPv4 address is a reg-name too (RFC 3986 3.2.2) */
        while (i < len && s[i] != ':') {
            unsigned char c = (unsigned char)s[i];
            if (c == '%' && i + 2 < len && hexdig((unsigned char)s[i + 1]) && hexdig((unsigned char)s[i + 2]))
                i += 3;
            else if (reg_name_char(c))
                i++;
            else
                return false;
        }
        if (i == 0)
            return false;
    }
    if (i == len)
        return true;
    if (s[i] != ':' || len - i - 1 < 1 || len - i - 1 > 5)
        return false;
    unsigned port = 0;
    for (i++; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        port = port * 10 + (unsigned)(s[i] - '0');
    }
    return port <= 65535;
}

static int
split_target(gw_parser_t *p)
{
    gw_req_t *r = p->req;
    const char *u = r->hbuf + r->url_off;
    size_t n = r->url_len;
    size_t start = 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)u[i] <= ' ' || u[i] == 0x7f) /* llhttp lets HTAB through */
            return set_error(p, 400, "invalid character in request target");
    if (n >= 7 && (strncasecmp(u, "http://", 7) == 0 || (n >= 8 && strncasecmp(u, "https://", 8) == 0))) {
        /* absolute-form: its authority is the request's host (RFC 9112
         * 3.2.2: it wins over Host), checked as Host is; the path is routed */
        size_t auth = (u[4] == ':') ? 7 : 8;
        start = auth;
        while (start < n && u[start] != '/' && u[start] != '?' && u[start] != '#')
            start++;
        if (!gw_http_host_valid(u + auth, start - auth))
            return set_error(p, 400, "invalid host in the absolute-form request target");
        r->host_off = r->url_off + auth;
        r->host_len = start - auth;
    } else if (n == 0 || u[0] != '/') {
        return set_error(p, 400, "request target must be an absolute path");
    }
    size_t end = start;
    while (end < n && u[end] != '?' && u[end] != '#')
        end++;
    r->path_off = r->url_off + start;
    r->path_len = end - start;
    if (end < n && u[end] == '?') {
        size_t q = end + 1, qe = q;
        while (qe < n && u[qe] != '#')
            qe++;
        r->query_off = r->url_off + q;
        r->query_len = qe - q;
    }
    if (gw_router_normalize(r->hbuf + r->path_off, r->path_len, &r->path) != GW_OK)
        return set_error(p, 400, "invalid path (bad escape, encoded NUL, or \"..\" above the root)");
    return 0;
}

static int
on_headers_complete(llhttp_t *ll)
{
    gw_parser_t *p = PARSER(ll);
    gw_req_t *r = p->req;
    p->headers_done = true;
    r->method = ll->method;
    r->http_major = ll->http_major;
    r->http_minor = ll->http_minor;
    set_request_id(r);
    if (r->http_major != 1) {
        set_error(p, r->http_major >= 2 ? 505 : 400, "unsupported HTTP version");
        return -1;
    }
    if ((r->http_minor == 1 && p->nhost != 1) || p->nhost > 1) {
        set_error(p, 400, p->nhost ? "more than one Host header" : "missing Host header");
        return -1;
    }
    size_t hlen = 0;
    const char *host = gw_req_header(r, "host", &hlen);
    if (host && !gw_http_host_valid(host, hlen)) {
        set_error(p, 400, "invalid Host header");
        return -1;
    }
    if (host) {
        r->host_off = (size_t)(host - r->hbuf);
        r->host_len = hlen;
    }
    if (r->method == HTTP_CONNECT) {
        set_error(p, 405, "CONNECT is not supported");
        return -1;
    }
    if (split_target(p) != 0)
        return -1;
    /* No protocol upgrades: the request is answered as plain HTTP. */
    ll->upgrade = 0;
    r->chunked = (ll->flags & F_CHUNKED) != 0;
    size_t te_len;
    const char *te = gw_req_header(r, "transfer-encoding", &te_len);
    if (te != NULL && (!r->chunked || r->http_minor == 0)) {
        /* llhttp lets an empty Transfer-Encoding frame nothing, and HTTP/1.0
         * has no transfer codings: the framing is faulty (RFC 9112 6.1) */
        set_error(p, 400,
                  r->chunked ? "Transfer-Encoding in an HTTP/1.0 request" : "Transfer-Encoding without chunked");
        return -1;
    }
    if (te != NULL && (te_len != 7 || strncasecmp(te, "chunked", 7) != 0)) {
        /* "gzip, chunked": gatherd could only pass the other codings on
         * without their name (Transfer-Encoding is hop-by-hop) */
        set_error(p, 501, "transfer codings other than chunked are not supported");
        return -1;
    }
    if (!r->chunked && ll->content_length > (uint64_t)INT64_MAX) {
        /* llhttp keeps 64 unsigned bits; a length gatherd cannot hold as a
         * signed count would turn negative and slip past every limit */
        set_error(p, 400, "Content-Length too large to represent");
        return -1;
    }
    r->has_body = r->chunked || ll->content_length > 0;
    r->content_length = r->chunked ? -1 : (int64_t)ll->content_length;
    if (r->http_minor == 0)
        r->expect_continue = false; /* RFC 9110: ignore Expect from HTTP/1.0 */
    if (r->has_body) {
        /* The caller routes the request before its body is read: the
         * route decides the body limit and whether the body streams. */
        p->paused_at_headers = true;
        return HPE_PAUSED;
    }
    return 0;
}

static int
on_body(llhttp_t *ll, const char *at, size_t len)
{
    gw_parser_t *p = PARSER(ll);
    gw_req_t *r = p->req;
    r->body_len += len;
    if (r->body_len > p->body_limit)
        return set_error(p, 413, "request body too large");
    if (p->body_mode == GW_BODY_DISCARD)
        return 0;
    if (p->body_mode == GW_BODY_KEEP && r->body_len > p->body_held) {
        /* a chunked body (a declared length was taken at once) */
        size_t more = r->body_len - p->body_held;
        if (!gw_budget_take(&gw_budget_bodies, more))
            return set_error(p, 503, "request bodies held in memory are at memory.request_body_bytes");
        p->body_held += more;
    }
    evbuffer_add(r->body, at, len);
    return 0;
}

static int
on_message_complete(llhttp_t *ll)
{
    gw_parser_t *p = PARSER(ll);
    p->req->keep_alive = llhttp_should_keep_alive(ll);
    return HPE_PAUSED;
}

static llhttp_settings_t settings;

static void
settings_build(void)
{
    llhttp_settings_init(&settings);
    settings.on_message_begin = on_message_begin;
    settings.on_url = on_url;
    settings.on_header_field = on_header_field;
    settings.on_header_field_complete = on_header_field_complete;
    settings.on_header_value = on_header_value;
    settings.on_header_value_complete = on_header_value_complete;
    settings.on_headers_complete = on_headers_complete;
    settings.on_body = on_body;
    settings.on_message_complete = on_message_complete;
}

static void
settings_init(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, settings_build);
}

static void
scan_reset(gw_parser_t *p)
{
    p->scan_done = false;
    p->scan_line_start = true;
    p->scan_first_line = true;
    p->scan_prev = '\0';
    p->scan_spaces = 0;
}

void
gw_parser_init(gw_parser_t *p, gw_req_t *req, const gw_http_limits_t *limits)
{
    settings_init();
    memset(p, 0, sizeof(*p));
    memset(req, 0, sizeof(*req));
    p->req = req;
    p->limits = limits;
    p->body_limit = limits->max_body_bytes;
    req->body = evbuffer_new();
    llhttp_init(&p->ll, HTTP_REQUEST, &settings);
    p->ll.data = p;
    scan_reset(p);
}

void
gw_parser_free(gw_parser_t *p)
{
    gw_req_t *r = p->req;
    if (r == NULL)
        return;
    gw_parser_body_release(p);
    free(r->hbuf);
    free(r->headers);
    if (r->body)
        evbuffer_free(r->body);
    gw_path_free(&r->path);
    p->req = NULL;
}

void
gw_parser_set_body_limit(gw_parser_t *p, size_t limit)
{
    p->body_limit = limit;
}

void
gw_parser_set_body_mode(gw_parser_t *p, gw_body_mode_t mode)
{
    p->body_mode = mode;
}

int
gw_parser_resume(gw_parser_t *p)
{
    gw_req_t *r = p->req;
    if (r->content_length > 0 && (uint64_t)r->content_length > p->body_limit) {
        set_error(p, 413, "request body too large");
        return GW_ERR;
    }
    if (p->body_mode == GW_BODY_KEEP && r->content_length > 0) {
        /* refused before a byte of it is read (and before 100 Continue) */
        if (!gw_budget_take(&gw_budget_bodies, (size_t)r->content_length)) {
            set_error(p, 503, "request bodies held in memory are at memory.request_body_bytes");
            return GW_ERR;
        }
        p->body_held = (size_t)r->content_length;
        /* one chain for the whole body: a big one is mapped on its own and
         * unmapped when the request ends (see gw_server_start) */
        evbuffer_expand(r->body, (size_t)r->content_length);
    }
    llhttp_resume(&p->ll);
    return GW_OK;
}

/* A connection keeps its head buffer for the next request, unless one
 * request made it bigger than this. */
#define HBUF_KEEP (64 * 1024)

void
gw_parser_body_release(gw_parser_t *p)
{
    gw_req_t *r = p->req;
    /* emptied whole: libevent frees every chain, so the memory goes back */
    if (r->body)
        evbuffer_drain(r->body, evbuffer_get_length(r->body));
    if (p->body_held) {
        gw_budget_give(&gw_budget_bodies, p->body_held);
        p->body_held = 0;
    }
}

void
gw_parser_next(gw_parser_t *p)
{
    gw_req_t *r = p->req;
    llhttp_resume(&p->ll);
    if (r->hcap > HBUF_KEEP) {
        free(r->hbuf);
        r->hbuf = NULL;
        r->hcap = 0;
    }
    r->hlen = 0;
    r->url_off = r->url_len = 0;
    r->path_off = r->path_len = 0;
    r->query_off = r->query_len = 0;
    r->host_off = r->host_len = 0;
    r->nheaders = 0;
    r->keep_alive = r->expect_continue = r->has_body = r->chunked = false;
    r->content_length = 0;
    p->body_limit = p->limits->max_body_bytes;
    p->body_mode = GW_BODY_KEEP;
    gw_parser_body_release(p);
    r->body_len = 0;
    r->request_id[0] = '\0';
    r->client_ip[0] = '\0';
    r->peer_trust = 0;
    p->status = 0;
    p->reason = NULL;
    p->started = p->headers_done = p->in_field = false;
    p->nhost = 0;
    p->trailer_len = 0;
    p->ck_state = 0;
    p->ck_size = p->ck_total = 0;
    p->ck_ext = 0;
    p->ck_digits = 0;
    scan_reset(p);
}

/*
 * Checks the header block (request line through the empty line) for what
 * llhttp tolerates: a LF without CR before it, a CR not followed by LF, and
 * obsolete line folding (a header line starting with SP or HTAB). Stops at
 * the end of the header block; the body is never scanned.
 */
static int
prescan(gw_parser_t *p, const char *data, size_t len)
{
    char prev = p->scan_prev;
    for (size_t i = 0; i < len && !p->scan_done; i++) {
        char b = data[i];
        if (b == '\n') {
            if (prev != '\r')
                return set_error(p, 400, "bare LF in request head");
            if (!p->scan_line_start) {
                if (p->scan_first_line && p->scan_spaces != 2)
                    return set_error(p, 400, "request line not made of three parts with one space between");
                p->scan_line_start = true;
                p->scan_first_line = false;
            } else if (!p->scan_first_line) {
                p->scan_done = true;
            }
        } else if (prev == '\r') {
            return set_error(p, 400, "CR not followed by LF in request head");
        } else if (b != '\r') {
            if (p->scan_line_start && !p->scan_first_line && (b == ' ' || b == '\t'))
                return set_error(p, 400, "obsolete line folding in request head");
            /* the request line: exactly "method SP target SP version", as
             * llhttp would also take several spaces or a tab */
            if (p->scan_first_line && (b == '\t' || (b == ' ' && (p->scan_line_start || prev == ' ' ||
                                                                   ++p->scan_spaces > 2))))
                return set_error(p, 400, "request line not made of three parts with one space between");
            p->scan_line_start = false;
        }
        prev = b;
    }
    p->scan_prev = prev;
    return 0;
}

/* Hex digits of one chunk size: 16 carry 64 bits; more are leading zeros,
 * allowed a few but not without end. */
#define CK_DIGITS_MAX 32

/* States of check_chunked(); 0 is the start of a chunk-size line. */
enum {
    CK_SIZE_FIRST,
    CK_SIZE,
    CK_EXT,
    CK_SIZE_LF,
    CK_DATA,
    CK_DATA_CR,
    CK_DATA_LF,
    CK_TRAILER_START,
    CK_TRAILER,
    CK_TRAILER_VALUE,
    CK_TRAILER_LF,
    CK_END_LF,
    CK_DONE
};

static int
hexval(unsigned char c)
{
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                  : -1;
}

/*
 * Checks the chunked body bytes data[0..len) (RFC 9112 7.1) on its own,
 * before llhttp sees them, so that what gatherd accepts does not depend on
 * llhttp's leniencies (llhttp 8 takes any byte for the LF after a CR in a
 * chunk line unless built in strict mode, and a bare-LF last line).
 * Every line ends in CRLF; a chunk size is at most 32 hex digits whose
 * value fits 64 bits (else 400) and whose sum with the chunks before stays
 * within the body limit (else 413 when its line ends, before its data is
 * read); extensions are visible characters, HTAB and SP, at most
 * max_header_bytes per request (413); a trailer line may not start with
 * SP or HTAB (obs-fold). *end is set to the offset just past the final
 * CRLF when the body ends in data, else to len.
 */
static int
check_chunked(gw_parser_t *p, const unsigned char *data, size_t len, size_t *end)
{
    *end = len;
    for (size_t i = 0; i < len; i++) {
        unsigned char b = data[i];
        switch (p->ck_state) {
        case CK_SIZE_FIRST:
        case CK_SIZE: {
            int d = hexval(b);
            if (d >= 0) {
                if (p->ck_size > (UINT64_MAX - (uint64_t)d) / 16)
                    return set_error(p, 400, "chunk size too large to represent");
                if (++p->ck_digits > CK_DIGITS_MAX)
                    return set_error(p, 400, "chunk size with too many leading zeros");
                p->ck_size = p->ck_size * 16 + (uint64_t)d;
                p->ck_state = CK_SIZE;
            } else if (p->ck_state == CK_SIZE && (b == ';' || b == '\r')) {
                if (p->ck_size > p->body_limit || p->ck_total > p->body_limit - p->ck_size)
                    return set_error(p, 413, "request body too large"); /* before its data is read */
                p->ck_state = b == ';' ? CK_EXT : CK_SIZE_LF;
            } else {
                return set_error(p, 400, "invalid chunk size");
            }
            break;
        }
        case CK_EXT:
            if (b == '\r') {
                p->ck_state = CK_SIZE_LF;
            } else if ((b < 0x20 && b != '\t') || b == 0x7f) {
                return set_error(p, 400, "invalid character in chunk extension");
            } else if (++p->ck_ext > p->limits->max_header_bytes) {
                return set_error(p, 413, "chunk extensions too large");
            }
            break;
        case CK_SIZE_LF:
            if (b != '\n')
                return set_error(p, 400, "CR not followed by LF in chunk size line");
            p->ck_total += p->ck_size;
            p->ck_digits = 0;
            p->ck_state = p->ck_size ? CK_DATA : CK_TRAILER_START;
            break;
        case CK_DATA: {
            size_t n = len - i;
            if (n > p->ck_size)
                n = (size_t)p->ck_size;
            p->ck_size -= n;
            i += n - 1;
            if (p->ck_size == 0)
                p->ck_state = CK_DATA_CR;
            break;
        }
        case CK_DATA_CR:
        case CK_DATA_LF:
            if (b != (p->ck_state == CK_DATA_CR ? '\r' : '\n'))
                return set_error(p, 400, "chunk data not followed by CRLF");
            p->ck_state = p->ck_state == CK_DATA_CR ? CK_DATA_LF : CK_SIZE_FIRST;
            break;
        case CK_TRAILER_START:
            if (b == ' ' || b == '\t')
                return set_error(p, 400, "obsolete line folding in request trailers");
            if (b == '\r') {
                p->ck_state = CK_END_LF;
                break;
            }
            if (!is_tchar(b))
                return set_error(p, 400, "invalid character in a request trailer name");
            p->ck_state = CK_TRAILER;
            break;
        case CK_TRAILER:
            /* a field name: a token up to the colon (llhttp does not check
             * the names of trailer fields) */
            if (b == ':')
                p->ck_state = CK_TRAILER_VALUE;
            else if (!is_tchar(b))
                return set_error(p, 400, "invalid character in a request trailer name");
            break;
        case CK_TRAILER_VALUE:
            if (b == '\r')
                p->ck_state = CK_TRAILER_LF;
            else if ((b < 0x20 && b != '\t') || b == 0x7f)
                return set_error(p, 400, "invalid character in a request trailer value");
            break;
        case CK_TRAILER_LF:
        case CK_END_LF:
            if (b != '\n')
                return set_error(p, 400, "CR not followed by LF in request trailers");
            if (p->ck_state == CK_TRAILER_LF) {
                p->ck_state = CK_TRAILER_START;
                break;
            }
            p->ck_state = CK_DONE;
            *end = i + 1;
            return 0;
        default: return set_error(p, 400, "bytes after the chunked body");
        }
    }
    return 0;
}

gw_parse_result_t
gw_parser_execute(gw_parser_t *p, const char *data, size_t len, size_t *consumed)
{
    *consumed = 0;
    if (p->status)
        return GW_PARSE_ERROR; /* a limit was exceeded at gw_parser_resume() */
    if (!p->scan_done && prescan(p, data, len) != 0)
        return GW_PARSE_ERROR;
    bool chunked = p->headers_done && p->req->chunked;
    size_t body_end = len;
    if (chunked && check_chunked(p, (const unsigned char *)data, len, &body_end) != 0)
        return GW_PARSE_ERROR;
    llhttp_errno_t err = llhttp_execute(&p->ll, data, len);
    if (err == HPE_OK) {
        if (chunked && p->ck_state == CK_DONE) {
            p->status = 400;
            p->reason = "chunked body framing disagreement (the body ended for gatherd, not for llhttp)";
            return GW_PARSE_ERROR;
        }
        *consumed = len;
        return GW_PARSE_AGAIN;
    }
    if (err == HPE_PAUSED) {
        *consumed = (size_t)(llhttp_get_error_pos(&p->ll) - data);
        if (p->paused_at_headers) {
            p->paused_at_headers = false;
            return GW_PARSE_HEADERS;
        }
        if (chunked && (p->ck_state != CK_DONE || *consumed != body_end)) {
            *consumed = 0;
            p->status = 400;
            p->reason = "chunked body framing disagreement (llhttp ended the body elsewhere)";
            return GW_PARSE_ERROR;
        }
        return GW_PARSE_DONE;
    }
    if (p->status == 0) {
        p->status = 400;
        p->reason = llhttp_get_error_reason(&p->ll);
        if (p->reason == NULL)
            p->reason = llhttp_errno_name(err);
    }
    return GW_PARSE_ERROR;
}

const char *
gw_req_host(const gw_req_t *r, size_t *len)
{
    *len = r->host_len;
    return r->host_len ? r->hbuf + r->host_off : NULL;
}

const char *
gw_req_header(const gw_req_t *r, const char *name, size_t *len)
{
    size_t nlen = strlen(name);
    for (size_t i = 0; i < r->nheaders; i++) {
        const gw_header_t *h = &r->headers[i];
        if (name_is(r, h, name, nlen)) {
            *len = h->value_len;
            return r->hbuf + h->value_off;
        }
    }
    return NULL;
}

bool
gw_http_idempotent(int method)
{
    return method == HTTP_GET || method == HTTP_HEAD || method == HTTP_PUT || method == HTTP_DELETE ||
           method == HTTP_OPTIONS || method == HTTP_TRACE;
}

const char *
gw_http_status_text(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 304: return "Not Modified";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 417: return "Expectation Failed";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return "Unknown";
    }
}

const char *
gw_http_date(void)
{
    static __thread time_t last;
    static __thread char buf[32];
    time_t now = time(NULL);
    if (now != last) {
        struct tm tm;
        gmtime_r(&now, &tm);
        strftime(buf, sizeof(buf), "%a, %d %b %Y %H:%M:%S GMT", &tm);
        last = now;
    }
    return buf;
}

void
gw_http_new_request_id(char buf[33])
{
    static __thread uint64_t s[2];
    if (s[0] == 0 && s[1] == 0) {
        if (getrandom(s, sizeof(s), 0) != (ssize_t)sizeof(s) || (s[0] == 0 && s[1] == 0)) {
            s[0] = (uint64_t)time(NULL) ^ (uint64_t)(uintptr_t)buf;
            s[1] = 0x9e3779b97f4a7c15ULL;
        }
    }
    static const char hex[] = "0123456789abcdef";
    for (int half = 0; half < 2; half++) {
        /* xorshift128+ */
        uint64_t x = s[0], y = s[1];
        s[0] = y;
        x ^= x << 23;
        s[1] = x ^ y ^ (x >> 17) ^ (y >> 26);
        uint64_t v = s[1] + y;
        for (int i = 0; i < 16; i++)
            buf[half * 16 + i] = hex[(v >> (i * 4)) & 15];
    }
    buf[32] = '\0';
}
