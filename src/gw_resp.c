/*
 * gw_resp.c - backend responses read under gatherd's rules (see gw_resp.h).
 *
 * llhttp does the framing; this file adds what llhttp 8 tolerates in a
 * response and a gateway must not: a pre-scan of every head and trailer
 * section for the CRLF discipline (llhttp accepts a bare LF ending the
 * status line or the head, and a CR not followed by LF after the status
 * line, which would hide the next field), field name and value characters,
 * the Transfer-Encoding list, statuses and versions, and limits on every
 * count a backend controls. Head and trailer sections are told apart by
 * pausing llhttp at their starts: after an interim response, and at the
 * last chunk. llhttp (built without LLHTTP_STRICT_MODE) also skips the two
 * bytes after a chunk's data and the byte after the CR of a chunk size
 * line without looking at them: a small scanner that runs just ahead of
 * llhttp over those places checks them to be CRLF.
 */
#include "gw_resp.h"

#include <pthread.h>
#include <string.h>
#include <strings.h>

#define RESP(ll) ((gw_resp_t *)(ll)->data)

static llhttp_settings_t settings;

static int
fail(gw_resp_t *r, gw_resp_error_t error, const char *why)
{
    if (r->error == GW_RESP_OK) {
        r->error = error;
        r->why = why;
    }
    return -1;
}

static int
bad(gw_resp_t *r, const char *why)
{
    return fail(r, GW_RESP_BAD, why);
}

/* Counts n bytes of names, values or reason phrase of the current section. */
static int
count_head(gw_resp_t *r, size_t n)
{
    if (n > GW_RESP_HEAD_MAX - r->head_bytes)
        return bad(r, r->trailers ? "trailer section over 64 KiB" : "response head over 64 KiB");
    r->head_bytes += (uint32_t)n;
    return 0;
}

static bool
is_tchar(unsigned char c)
{
    static const char extra[] = "!#$%&'*+-.^_`|~";
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c && memchr(extra, c, sizeof(extra) - 1) != NULL);
}

/* A control character other than HTAB (field values, reason phrase). */
static bool
has_ctl(const char *at, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)at[i];
        if ((c < 0x20 && c != '\t') || c == 0x7f)
            return true;
    }
    return false;
}

/* --- the pre-scan of a head or trailer section ----------------------------- */

static void
scan_start(gw_resp_t *r, bool trailers)
{
    r->scanning = true;
    r->scan_line_start = true;
    r->scan_first_line = !trailers; /* a trailer section may end at once */
    r->scan_prev = '\0';
    r->scan_col = 0;
}

/* Whether b may be at column col of a status line: "HTTP/" DIGIT "."
 * DIGIT SP 3DIGIT, then SP or the line end (llhttp takes a status of
 * any number of digits up to 999: "0100" would be a 100). */
static bool
status_line_byte(unsigned col, char b)
{
    static const char shape[] = "HTTP/9.9 999";
    if (col >= sizeof(shape) - 1)
        return col > sizeof(shape) - 1 || b == ' ' || b == '\r';
    if (shape[col] == '9')
        return b >= '0' && b <= '9';
    return b == shape[col];
}

/* Checks the section from its start to its empty line, across calls: every
 * LF after a CR, every CR before a LF, no line starting with SP or HTAB
 * (obsolete folding) and no empty line before the status line. The body is
 * never scanned. */
static int
prescan(gw_resp_t *r, const char *data, size_t len)
{
    char prev = r->scan_prev;
    for (size_t i = 0; i < len && r->scanning; i++) {
        char b = data[i];
        if (b == '\n') {
            if (prev != '\r')
                return bad(r, "bare LF in a response head");
            if (!r->scan_line_start) {
                r->scan_line_start = true;
                r->scan_first_line = false;
            } else if (r->scan_first_line) {
                return bad(r, "empty line before the status line");
            } else {
                r->scanning = false;
                r->body_start = data + i + 1; /* for check_framing(), in this gw_resp_execute() */
            }
        } else if (prev == '\r') {
            return bad(r, "CR not followed by LF in a response head");
        } else if (b != '\r') {
            if (r->scan_line_start && !r->scan_first_line && (b == ' ' || b == '\t'))
                return bad(r, "obsolete line folding in a response head");
            r->scan_line_start = false;
        }
        if (r->scan_first_line && b != '\n' && r->scan_col <= 12) {
            if (!status_line_byte(r->scan_col, b))
                return bad(r, "malformed status line");
            r->scan_col++;
        }
        prev = b;
    }
    r->scan_prev = prev;
    return 0;
}

/* Where check_framing() is in the chunked framing. */
enum { FC_NONE, FC_CR, FC_LF, FC_LINE, FC_LINE_LF };

/* Checks, from p to the end of the bytes at hand, the CRLF after a chunk's
 * data and the line end of the chunk size line after it; what is not there
 * yet is checked at the next gw_resp_execute(). */
static int
check_framing(gw_resp_t *r, const char *p, const char *end)
{
    for (; p < end && r->frame_check != FC_NONE; p++) {
        char b = *p;
        switch (r->frame_check) {
        case FC_CR:
        case FC_LF:
            if (b != (r->frame_check == FC_CR ? '\r' : '\n'))
                return bad(r, "chunk data not followed by CRLF");
            r->frame_check = r->frame_check == FC_CR ? FC_LF : FC_LINE;
            break;
        case FC_LINE:
            if (b == '\n')
                return bad(r, "bare LF in a chunk size line");
            if (b == '\r')
                r->frame_check = FC_LINE_LF;
            break;
        default:
            if (b != '\n')
                return bad(r, "CR not followed by LF in a chunk size line");
            r->frame_check = FC_NONE;
        }
    }
    return 0;
}

/* --- llhttp callbacks ------------------------------------------------------ */

static int
on_message_begin(llhttp_t *ll)
{
    gw_resp_t *r = RESP(ll);
    r->head_bytes = r->nfields = 0;
    r->in_field = r->is_te = r->te_comma = false;
    r->te_fields = 0;
    return 0;
}

static int
on_status(llhttp_t *ll, const char *at, size_t len)
{
    gw_resp_t *r = RESP(ll);
    if (has_ctl(at, len))
        return bad(r, "control character in the reason phrase");
    return count_head(r, len);
}

static int
on_field(llhttp_t *ll, const char *at, size_t len)
{
    gw_resp_t *r = RESP(ll);
    if (!r->in_field) {
        r->in_field = true;
        r->name_len = 0;
        if (++r->nfields > GW_RESP_FIELDS_MAX)
            return bad(r, r->trailers ? "more than 200 trailer fields" : "more than 200 response header fields");
    }
    for (size_t i = 0; i < len; i++)
        if (!is_tchar((unsigned char)at[i]))
            return bad(r, "invalid character in a field name");
    if (count_head(r, len) != 0)
        return -1;
    if (r->name_len < sizeof(r->name)) /* the start of the name is enough to see Transfer-Encoding */
        memcpy(r->name + r->name_len, at, GW_MIN(len, sizeof(r->name) - r->name_len));
    r->name_len += (uint32_t)len; /* at most GW_RESP_HEAD_MAX: counted above */
    if (r->ops->field && !r->trailers && r->ops->field(r, at, len) != GW_OK)
        return fail(r, GW_RESP_STOPPED, NULL);
    return 0;
}

static int
on_field_complete(llhttp_t *ll)
{
    gw_resp_t *r = RESP(ll);
    if (!r->in_field || r->name_len == 0)
        return bad(r, "empty field name");
    r->in_field = false;
    r->is_te = !r->trailers && r->name_len == 17 && strncasecmp(r->name, "transfer-encoding", 17) == 0;
    if (r->is_te)
        r->te_fields++;
    return 0;
}

static int
on_value(llhttp_t *ll, const char *at, size_t len)
{
    gw_resp_t *r = RESP(ll);
    if (has_ctl(at, len))
        return bad(r, "control character in a field value");
    if (count_head(r, len) != 0)
        return -1;
    if (r->is_te && memchr(at, ',', len))
        r->te_comma = true;
    if (r->ops->value && !r->trailers && r->ops->value(r, at, len) != GW_OK)
        return fail(r, GW_RESP_STOPPED, NULL);
    return 0;
}

static int
on_value_complete(llhttp_t *ll)
{
    gw_resp_t *r = RESP(ll);
    if (r->ops->value_done && !r->trailers && r->ops->value_done(r) != GW_OK)
        return fail(r, GW_RESP_STOPPED, NULL);
    return 0;
}

static int
on_headers_complete(llhttp_t *ll)
{
    gw_resp_t *r = RESP(ll);
    int status = ll->status_code;
    if (ll->http_major != 1 || ll->http_minor > 1)
        return bad(r, "HTTP version other than 1.0 and 1.1");
    if (status < 100 || status > 599)
        return bad(r, "status outside 100-599");
    if (status == 101)
        return bad(r, "101 Switching Protocols, but no upgrade was asked for");
    if (status < 200) {
        if (++r->interim > GW_RESP_INTERIM_MAX)
            return bad(r, "more than 32 interim (1xx) responses");
        if (r->ops->reset)
            r->ops->reset(r);
        return 1; /* never a body; the final head follows */
    }
    /* llhttp takes chunked framing when "chunked" is the last coding and a
     * close-delimited body for any other list: only "chunked" alone, in one
     * field, is a framing we can pass on or decode. */
    if (r->te_fields && (!(ll->flags & F_CHUNKED) || r->te_fields > 1 || r->te_comma))
        return bad(r, "Transfer-Encoding other than chunked");
    bool no_body = r->head_request || status == 204 || status == 304;
    r->status = status;
    r->chunked = (ll->flags & F_CHUNKED) != 0;
    r->content_length = -1;
    if ((ll->flags & F_CONTENT_LENGTH) && !r->chunked) {
        if (ll->content_length > (uint64_t)INT64_MAX)
            return bad(r, "Content-Length over 2^63-1");
        if (!no_body && ll->content_length > r->max_body)
            return fail(r, GW_RESP_TOO_LARGE, "Content-Length over the limit");
        r->content_length = (int64_t)ll->content_length;
    }
    r->head_done = true;
    r->trailers = true; /* fields from here on are trailers (and get their own budget) */
    r->head_bytes = r->nfields = 0;
    if (r->ops->head(r) != GW_OK)
        return fail(r, GW_RESP_STOPPED, NULL);
    if (r->chunked && !no_body) {
        r->frame_check = FC_LINE; /* the first chunk size line starts where the head ended */
        if (check_framing(r, r->body_start, r->exec_end) != 0)
            return -1;
    }
    return no_body ? 1 : 0;
}

/* Counts n bytes of chunk extensions on the current chunk line. */
static int
count_ext(gw_resp_t *r, size_t n)
{
    if (n > GW_RESP_CHUNK_EXT_MAX - r->ext_bytes)
        return bad(r, "chunk extensions over 4 KiB");
    r->ext_bytes += (uint32_t)n;
    return 0;
}

static int
on_chunk_extension(llhttp_t *ll, const char *at, size_t len)
{
    GW_UNUSED(at);
    return count_ext(RESP(ll), len);
}

static int
on_chunk_extension_part(llhttp_t *ll, const char *at, size_t len)
{
    gw_resp_t *r = RESP(ll);
    r->ext_name_bytes += (uint32_t)(len > 1 ? 1 : len); /* only whether there is one */
    return on_chunk_extension(ll, at, len);
}

/* A name is a token: one character at least (llhttp 8 takes ";=v"). The
 * ";" before a name and the "=" before a value count in the 4 KiB too. */
static int
on_chunk_extension_name_complete(llhttp_t *ll)
{
    gw_resp_t *r = RESP(ll);
    bool empty = r->ext_name_bytes == 0;
    r->ext_name_bytes = 0;
    if (empty)
        return bad(r, "an empty chunk extension name");
    return count_ext(r, 1);
}

/* A value after "=" is a token or a quoted string: never empty (llhttp 8
 * takes ";a=", and refuses the empty quoted string ";a=\"\"" itself, so
 * no valid value reaches here without bytes). Its "=" counts too. */
static int
on_chunk_extension_value_complete(llhttp_t *ll)
{
    gw_resp_t *r = RESP(ll);
    bool empty = r->ext_name_bytes == 0;
    r->ext_name_bytes = 0;
    if (empty)
        return bad(r, "an empty chunk extension value");
    return count_ext(r, 1);
}


static int
on_chunk_header(llhttp_t *ll)
{
    gw_resp_t *r = RESP(ll);
    uint64_t size = ll->content_length;
    r->ext_bytes = 0;
    if (size > r->max_body - r->body_bytes)
        return fail(r, GW_RESP_TOO_LARGE, "chunk size over the limit");
    r->chunk_left = size;
    if (size == 0)
        return HPE_PAUSED; /* the trailer section starts here: gw_resp_execute() scans it */
    return 0;
}

static int
on_body(llhttp_t *ll, const char *at, size_t len)
{
    gw_resp_t *r = RESP(ll);
    if (len > r->max_body - r->body_bytes)
        return fail(r, GW_RESP_TOO_LARGE, "body over the limit");
    if (r->chunked) {
        r->chunk_left -= len; /* llhttp hands over at most the chunk's size */
        if (r->chunk_left == 0) {
            r->frame_check = FC_CR;
            if (check_framing(r, at + len, r->exec_end) != 0)
                return -1;
        }
    }
    r->body_bytes += len;
    if (r->ops->body(r, at, len) != GW_OK)
        return fail(r, GW_RESP_STOPPED, NULL);
    return 0;
}

static int
on_message_complete(llhttp_t *ll)
{
    gw_resp_t *r = RESP(ll);
    if (r->head_done)
        r->done = true;
    return HPE_PAUSED; /* the end of an interim response pauses too: the next head is scanned */
}

static void
settings_build(void)
{
    llhttp_settings_init(&settings);
    settings.on_message_begin = on_message_begin;
    settings.on_status = on_status;
    settings.on_header_field = on_field;
    settings.on_header_field_complete = on_field_complete;
    settings.on_header_value = on_value;
    settings.on_header_value_complete = on_value_complete;
    settings.on_headers_complete = on_headers_complete;
    settings.on_chunk_extension_name = on_chunk_extension_part;
    settings.on_chunk_extension_value = on_chunk_extension_part;
    settings.on_chunk_extension_name_complete = on_chunk_extension_name_complete;
    settings.on_chunk_extension_value_complete = on_chunk_extension_value_complete;
    settings.on_chunk_header = on_chunk_header;
    settings.on_body = on_body;
    settings.on_message_complete = on_message_complete;
}

/* --- the interface --------------------------------------------------------- */

void
gw_resp_init(gw_resp_t *r, const gw_resp_ops_t *ops, void *arg, uint64_t max_body, bool head_request)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, settings_build);
    memset(r, 0, sizeof(*r));
    llhttp_init(&r->ll, HTTP_RESPONSE, &settings);
    r->ll.data = r;
    r->ops = ops;
    r->arg = arg;
    r->max_body = GW_MIN(max_body, (uint64_t)INT64_MAX);
    r->head_request = head_request;
    r->content_length = -1;
    scan_start(r, false);
}

gw_resp_result_t
gw_resp_execute(gw_resp_t *r, const char *data, size_t len, size_t *used)
{
    size_t off = 0;
    *used = 0;
    if (r->error != GW_RESP_OK)
        return GW_RESP_ERROR;
    if (r->done)
        return GW_RESP_DONE;
    r->exec_end = data + len;
    if (check_framing(r, data, data + len) != 0)
        return GW_RESP_ERROR;
    for (;;) {
        if (r->scanning && prescan(r, data + off, len - off) != 0)
            return GW_RESP_ERROR;
        llhttp_errno_t err = llhttp_execute(&r->ll, data + off, len - off);
        if (err == HPE_OK) {
            *used = len;
            return GW_RESP_MORE;
        }
        if (err != HPE_PAUSED || r->error != GW_RESP_OK) {
            if (r->error == GW_RESP_OK) {
                r->error = GW_RESP_BAD;
                r->why = llhttp_get_error_reason(&r->ll);
                if (r->why == NULL)
                    r->why = llhttp_errno_name(err);
            }
            return GW_RESP_ERROR;
        }
        off = (size_t)(llhttp_get_error_pos(&r->ll) - data);
        *used = off;
        if (r->done)
            return GW_RESP_DONE;
        /* paused where a section starts: after an interim response (a
         * head), or after the last chunk (the trailers) */
        llhttp_resume(&r->ll);
        if (!r->head_done) {
            /* after an interim response that is not keep-alive (HTTP/1.0,
             * "Connection: close") llhttp would swallow the rest unread:
             * the final response decides what becomes of the connection */
            llhttp_reset(&r->ll);
        }
        scan_start(r, r->head_done);
    }
}

gw_resp_result_t
gw_resp_eof(gw_resp_t *r)
{
    if (r->done)
        return GW_RESP_DONE;
    if (r->error == GW_RESP_OK && r->head_done && llhttp_message_needs_eof(&r->ll)) {
        /* a close-delimited body ends here (on_message_complete pauses, so
         * llhttp_finish() reports HPE_PAUSED: done says it ended) */
        llhttp_errno_t err = llhttp_finish(&r->ll);
        if (r->done || (err == HPE_OK && r->error == GW_RESP_OK)) {
            r->done = true;
            return GW_RESP_DONE;
        }
    }
    if (r->error == GW_RESP_OK) {
        r->error = GW_RESP_TRUNCATED;
        r->why = r->head_done ? "the connection closed before the end of the body"
                              : "the connection closed before the end of the head";
    }
    return GW_RESP_ERROR;
}

bool
gw_resp_keep_alive(const gw_resp_t *r)
{
    return r->done && llhttp_should_keep_alive(&r->ll);
}
