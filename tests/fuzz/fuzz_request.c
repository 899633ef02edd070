/*
 * libFuzzer driver for the request parser (src/gw_http.c): the input is fed
 * as one or more requests, split at a point chosen by the first byte, and
 * every request that completes is followed by gw_parser_next() as a
 * connection would. Crashes, leaks and UB are what it looks for.
 */
#include "gw_http.h"

#include <event2/buffer.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const gw_http_limits_t limits = {
        .max_header_bytes = 4096, .max_headers = 50, .max_url_bytes = 1024, .max_body_bytes = 4096,
    };
    if (size < 1)
        return 0;
    size_t split = data[0];
    data++;
    size--;
    gw_parser_t p;
    gw_req_t r;
    gw_parser_init(&p, &r, &limits);
    size_t off = 0;
    for (int guard = 0; off < size && guard < 10000; guard++) {
        size_t n = size - off;
        if (split && n > split)
            n = split;
        size_t used = 0;
        gw_parse_result_t res = gw_parser_execute(&p, (const char *)data + off, n, &used);
        off += used;
        if (res == GW_PARSE_ERROR)
            break;
        if (res == GW_PARSE_HEADERS)
            gw_parser_resume(&p);
        else if (res == GW_PARSE_DONE) {
            size_t len;
            (void)gw_req_header(&r, "host", &len);
            gw_parser_next(&p);
        }
    }
    gw_parser_free(&p);
    return 0;
}
