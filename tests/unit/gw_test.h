/*
 * gw_test.h - the smallest test harness that does the job: CHECK records a
 * failure with file and line and goes on; SKIP(why) leaves a test that
 * cannot run here (counted as skipped, never as passed); TEST_MAIN runs the
 * listed tests and ends with the line "N passed, N failed" (", N skipped"
 * appended when a test was skipped) that the suite runner reads.
 */
#ifndef GW_TEST_H
#define GW_TEST_H

#include <stdio.h>
#include <string.h>

static int gw_test_failed_checks;
static const char *gw_test_skip_reason; /* set by SKIP in the running test */

/* Ends the running test (a void function) as skipped, saying why. */
#define SKIP(why)                                                                                                      \
    do {                                                                                                               \
        gw_test_skip_reason = (why);                                                                                   \
        return;                                                                                                        \
    } while (0)

#define CHECK(cond)                                                                                                    \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            printf("    %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);                                        \
            gw_test_failed_checks++;                                                                                   \
        }                                                                                                              \
    } while (0)

#define CHECK_STR(a, b)                                                                                                \
    do {                                                                                                               \
        const char *a_ = (a), *b_ = (b);                                                                               \
        if (a_ == NULL || b_ == NULL || strcmp(a_, b_) != 0) {                                                         \
            printf("    %s:%d: \"%s\" != \"%s\"\n", __FILE__, __LINE__, a_ ? a_ : "(null)", b_ ? b_ : "(null)");       \
            gw_test_failed_checks++;                                                                                   \
        }                                                                                                              \
    } while (0)

#define CHECK_CONTAINS(hay, needle)                                                                                    \
    do {                                                                                                               \
        const char *h_ = (hay), *n_ = (needle);                                                                        \
        if (h_ == NULL || strstr(h_, n_) == NULL) {                                                                    \
            printf("    %s:%d: \"%s\" does not contain \"%s\"\n", __FILE__, __LINE__, h_ ? h_ : "(null)", n_);       \
            gw_test_failed_checks++;                                                                                   \
        }                                                                                                              \
    } while (0)

typedef struct {
    const char *name;
    void (*fn)(void);
} gw_test_t;

#define TEST_MAIN(...)                                                                                                 \
    int main(void)                                                                                                     \
    {                                                                                                                  \
        static const gw_test_t tests[] = { __VA_ARGS__ };                                                              \
        int passed = 0, failed = 0, skipped = 0;                                                                       \
        for (size_t i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {                                                \
            int before = gw_test_failed_checks;                                                                        \
            gw_test_skip_reason = NULL;                                                                                \
            tests[i].fn();                                                                                             \
            if (gw_test_failed_checks != before) {                                                                     \
                failed++;                                                                                              \
                printf("FAIL - %s\n", tests[i].name);                                                                  \
            } else if (gw_test_skip_reason != NULL) {                                                                  \
                skipped++;                                                                                             \
                printf("ok - %s # skip %s\n", tests[i].name, gw_test_skip_reason);                                     \
            } else {                                                                                                   \
                passed++;                                                                                              \
                printf("ok - %s\n", tests[i].name);                                                                    \
            }                                                                                                          \
        }                                                                                                              \
        if (skipped)                                                                                                   \
            printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);                                     \
        else                                                                                                           \
            printf("%d passed, %d failed\n", passed, failed);                                                          \
        return failed ? 1 : skipped && !passed ? 77 : 0;                                                               \
    }

#define T(fn) { #fn, fn }

#endif
