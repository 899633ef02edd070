/*
 * gw_resp.h - reading one backend response under gatherd's rules, for
 * proxy routes and aggregate calls alike: llhttp (HTTP_RESPONSE) plus the
 * checks llhttp leaves out, so that what a backend sends is either one
 * well-framed message or an error, never a guess.
 *
 * Rejected (GW_RESP_ERROR, r->why says what): a status outside 100-599, 101
 * (gatherd never asks for an upgrade), an HTTP version other than 1.0 and
 * 1.1, a bare LF, a CR without LF, obsolete line folding or a leading empty
 * line in a head or trailer section (our pre-scan), an empty or non-token
 * field name, a control character in a field value or the reason phrase,
 * a Transfer-Encoding other than exactly "chunked", more than 200 fields
 * or 64 KiB of names and values in a head (or in the trailers), more than
 * 32 interim (1xx) heads, more than 4 KiB of chunk extensions on one chunk
 * line, and what llhttp rejects (Content-Length with Transfer-Encoding,
 * two Content-Lengths, bad chunk sizes, ...). GW_RESP_TOO_LARGE: the body
 * would pass max_body (a Content-Length or a chunk size is judged when it
 * is read, before any of its bytes). 1xx heads other than 101 are skipped;
 * a 204, a 304 and the answer to a HEAD request have no body whatever
 * their head says.
 *
 * Ownership: a gw_resp_t is embedded in its owner's context and holds no
 * allocation, so it needs no freeing. The owner's callbacks (ops) get it
 * back; r->arg is the owner's.
 */
#ifndef GW_RESP_H
#define GW_RESP_H

#include "gw_core.h"

#include <llhttp.h>

typedef struct gw_resp_s gw_resp_t;

/* Limits of one head (or trailer section) and of a chunk line. */
#define GW_RESP_HEAD_MAX (64 * 1024)
#define GW_RESP_FIELDS_MAX 200
#define GW_RESP_INTERIM_MAX 32
#define GW_RESP_CHUNK_EXT_MAX 4096

/*
 * The owner's side. head: the final head is in (r->status, r->content_length,
 * r->chunked set); body: len body bytes (already counted against
 * max_body). Both return GW_OK to go on, GW_ERR to stop reading
 * (gw_resp_execute() then returns GW_RESP_ERROR with r->error
 * GW_RESP_STOPPED). field/value/value_done (may be NULL): the fields of
 * the final head as llhttp hands them over (a name or value may come in
 * several pieces), only after they passed the checks; trailers are checked
 * but not handed over. reset (may be NULL): an interim head was skipped,
 * forget the fields kept of it.
 */
typedef struct {
    int (*head)(gw_resp_t *r);
    int (*body)(gw_resp_t *r, const char *at, size_t len);
    int (*field)(gw_resp_t *r, const char *at, size_t len);
    int (*value)(gw_resp_t *r, const char *at, size_t len);
    int (*value_done)(gw_resp_t *r);
    void (*reset)(gw_resp_t *r);
} gw_resp_ops_t;

typedef enum {
    GW_RESP_MORE,  /* every byte was used; the message goes on */
    GW_RESP_DONE,  /* the message is complete; *used: its last byte and those before */
    GW_RESP_ERROR  /* r->error and r->why say why; the connection cannot be reused */
} gw_resp_result_t;

typedef enum {
    GW_RESP_OK = 0,
    GW_RESP_BAD,       /* not a valid HTTP/1.x response */
    GW_RESP_TOO_LARGE, /* the body would pass max_body */
    GW_RESP_STOPPED,   /* an owner's callback said stop */
    GW_RESP_TRUNCATED  /* the connection ended before the message did (gw_resp_eof) */
} gw_resp_error_t;

struct gw_resp_s {
    llhttp_t ll;
    const gw_resp_ops_t *ops;
    void *arg;
    uint64_t max_body; /* at most INT64_MAX */
    bool head_request; /* the request was HEAD: no body */
    /* the final head, from ops->head on */
    int status;
    int64_t content_length; /* its Content-Length, -1 without one (chunked, close-delimited) */
    bool chunked;
    bool head_done, done;
    uint64_t body_bytes;
    gw_resp_error_t error;
    const char *why; /* static text */
    /* per head or trailer section */
    uint32_t head_bytes, nfields, interim, ext_bytes;
    uint32_t ext_name_bytes; /* of the chunk extension name or value being read: 0 or 1 */
    uint64_t chunk_left;  /* data bytes of the current chunk still to come */
    int frame_check;      /* what the chunk framing check waits for (gw_resp.c) */
    const char *exec_end; /* the end of the bytes gw_resp_execute() was given */
    const char *body_start; /* where the head the pre-scan just finished ends */
    bool trailers;
    bool in_field;     /* a field name is being read */
    bool is_te;        /* the current field is Transfer-Encoding */
    unsigned te_fields;
    bool te_comma;
    uint32_t name_len; /* of the current field; name keeps its start */
    char name[20];
    /* the pre-scan of a head or trailer section (CRLF discipline) */
    bool scanning, scan_line_start, scan_first_line;
    char scan_prev;
    unsigned scan_col; /* of the status line, up to its 13th byte */
};

/* Prepares r for one response; max_body: the largest body accepted (at
 * most INT64_MAX); head_request: the request was HEAD. */
void gw_resp_init(gw_resp_t *r, const gw_resp_ops_t *ops, void *arg, uint64_t max_body, bool head_request);

/* Reads len bytes of the response (see gw_resp_result_t). *used: the bytes
 * that belong to it (all of them unless DONE or ERROR). */
gw_resp_result_t gw_resp_execute(gw_resp_t *r, const char *data, size_t len, size_t *used);

/* The backend closed the connection: GW_RESP_DONE when that ends the
 * message (a close-delimited body, or it was complete already), else
 * GW_RESP_ERROR with r->error GW_RESP_TRUNCATED. */
gw_resp_result_t gw_resp_eof(gw_resp_t *r);

/* After GW_RESP_DONE: whether the backend allows another request on the
 * connection (the caller also checks that nothing else arrived). */
bool gw_resp_keep_alive(const gw_resp_t *r);

#endif
