/* A wall clock that can be moved, for tests of a gateway without a real-time clock (tests/test_clock_daemon.py).
 *
 * LD_PRELOAD it with GATEWAYD_WALLTIME_FILE naming a file that holds an offset in seconds (e.g. -1728000 for
 * 20 days behind): CLOCK_REALTIME (clock_gettime, gettimeofday, time) is shifted by that offset, read again
 * whenever the file changes. Nothing else is touched: the monotonic and boot-time clocks and every sleep stay
 * real, as on a Raspberry Pi whose wall clock NTP sets with one jump. (Debian's libfaketime 0.9.10 fakes the
 * monotonic clock too, or, with FAKETIME_DONT_FAKE_MONOTONIC=1, makes Python's time.sleep fail with EINVAL.)
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>

static int (*real_clock_gettime)(clockid_t, struct timespec *);

static long long offset_ns(void) {
    static struct timespec seen_mtime;
    static long long offset;
    static ino_t seen_ino;
    const char *path = getenv("GATEWAYD_WALLTIME_FILE");
    struct stat st;
    if (path == NULL || stat(path, &st) != 0)
        return offset;
    if (st.st_ino != seen_ino || st.st_mtim.tv_sec != seen_mtime.tv_sec ||
        st.st_mtim.tv_nsec != seen_mtime.tv_nsec) {
        FILE *f = fopen(path, "r");
        double seconds;
        if (f != NULL) {
            if (fscanf(f, "%lf", &seconds) == 1) {
                offset = (long long)(seconds * 1e9);
                seen_ino = st.st_ino;
                seen_mtime = st.st_mtim;
            }
            fclose(f);
        }
    }
    return offset;
}

static void shift(struct timespec *ts) {
    long long ns = (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec + offset_ns();
    ts->tv_sec = ns / 1000000000LL;
    ts->tv_nsec = ns % 1000000000LL;
    if (ts->tv_nsec < 0) {
        ts->tv_nsec += 1000000000LL;
        ts->tv_sec -= 1;
    }
}

int clock_gettime(clockid_t clock, struct timespec *ts) {
    if (real_clock_gettime == NULL)
        real_clock_gettime = dlsym(RTLD_NEXT, "clock_gettime");
    int rc = real_clock_gettime(clock, ts);
    if (rc == 0 && (clock == CLOCK_REALTIME || clock == CLOCK_REALTIME_COARSE))
        shift(ts);
    return rc;
}

int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    (void)tz;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0)
        return -1;
    tv->tv_sec = ts.tv_sec;
    tv->tv_usec = ts.tv_nsec / 1000;
    return 0;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out != NULL)
        *out = ts.tv_sec;
    return ts.tv_sec;
}
