/* Unit tests for src/gw_log.c: the rate limit of repeated lines. Eight
 * threads log through one call site and through a second one until the
 * clock has passed two whole seconds (so windows end while every thread
 * logs); stderr is a file the test reads back. The model it checks: per call site and per
 * second of the lines' time stamps, at most GW_LOG_RL_BURST lines, and the
 * lines written plus the counts of the summaries equal the lines logged
 * (no line lost, none counted twice), whichever thread ends a window. */
#include "gw_log.h"
#include "gw_test.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define THREADS 8

static time_t until;            /* the threads stop at this second */
static long logged[THREADS][2]; /* lines each thread logged at site A, B */

static void *
hammer(void *arg)
{
    int id = (int)(intptr_t)arg;
    for (long i = 0; time(NULL) < until; i++) {
        gw_log_rl(GW_LOG_WARN, "site A: thread %d line %ld", id, i);
        logged[id][0]++;
        if (i % 4 == 0) {
            gw_log_rl(GW_LOG_ERR, "site B: thread %d line %ld", id, i);
            logged[id][1]++;
        }
        if (i % 64 == 63) {
            struct timespec pause = { 0, 200 * 1000 }; /* concurrent, not a CPU hog */
            nanosleep(&pause, NULL);
        }
    }
    return NULL;
}

typedef struct {
    long written, summarised, summaries;
    int max_per_second;
} site_t;

/* Counts the lines of stderr's file for the site whose lines start with
 * prefix and whose format (in summaries) starts with fmt_prefix. */
static site_t
count(const char *path, const char *prefix, const char *fmt_prefix)
{
    site_t s = { 0, 0, 0, 0 };
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return s;
    char line[4096], second[32] = "", seen[32] = "";
    int in_second = 0;
    while (fgets(line, sizeof(line), f)) {
        char *msg = strstr(line, ": "); /* after "time [level] thread" */
        if (msg == NULL)
            continue;
        msg += 2;
        long n;
        char fmt[256];
        if (sscanf(msg, "... and %ld more like this in the last second: \"%255[^\"]\"", &n, fmt) == 2) {
            if (strncmp(fmt, fmt_prefix, strlen(fmt_prefix)) == 0) {
                s.summarised += n;
                s.summaries++;
            }
        } else if (strncmp(msg, prefix, strlen(prefix)) == 0) {
            s.written++;
            snprintf(second, sizeof(second), "%.19s", line); /* YYYY-MM-DDTHH:MM:SS */
            in_second = strcmp(second, seen) == 0 ? in_second + 1 : 1;
            snprintf(seen, sizeof(seen), "%s", second);
            if (in_second > s.max_per_second)
                s.max_per_second = in_second;
        }
    }
    fclose(f);
    return s;
}

static void
test_rate_limit_counts_every_line_once(void)
{
    char path[] = "/tmp/gw-test-log-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    if (fd < 0)
        return;
    fflush(stderr);
    int saved = dup(STDERR_FILENO);
    dup2(fd, STDERR_FILENO); /* no log writer runs: lines go to stderr, each with one write */
    close(fd);
    gw_log_set_level(GW_LOG_INFO);
    until = time(NULL) + 3; /* seconds S+1 and S+2 whole: two full windows at least */
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++)
        pthread_create(&t[i], NULL, hammer, (void *)(intptr_t)i);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    gw_log_rl_flush(true); /* the last window's summaries, as at exit */
    /* a line below the level is neither written nor counted */
    gw_log_set_level(GW_LOG_ERR);
    gw_log_rl(GW_LOG_WARN, "site C: %d", 1);
    gw_log_rl_flush(true);
    dup2(saved, STDERR_FILENO);
    close(saved);

    long want_a = 0, want_b = 0;
    for (int i = 0; i < THREADS; i++) {
        want_a += logged[i][0];
        want_b += logged[i][1];
    }
    site_t a = count(path, "site A: ", "site A: ");
    site_t b = count(path, "site B: ", "site B: ");
    site_t c = count(path, "site C: ", "site C: ");
    printf("    site A: %ld logged, %ld written, %ld summarised in %ld summaries; site B: %ld, %ld, %ld in %ld\n",
           want_a, a.written, a.summarised, a.summaries, want_b, b.written, b.summarised, b.summaries);
    CHECK(a.written + a.summarised == want_a);
    CHECK(b.written + b.summarised == want_b);
    /* two whole seconds: two full windows at least */
    CHECK(a.written >= 2 * GW_LOG_RL_BURST && a.max_per_second <= GW_LOG_RL_BURST);
    CHECK(b.written >= 2 * GW_LOG_RL_BURST && b.max_per_second <= GW_LOG_RL_BURST);
    CHECK(a.summaries >= 2 && b.summaries >= 2);
    CHECK(c.written == 0 && c.summarised == 0);
    unlink(path);
}

TEST_MAIN(T(test_rate_limit_counts_every_line_once))
