/* The boot benchmark's workload: its first line says how long after kernel start it ran
 * (CLOCK_BOOTTIME counts from the kernel's start), then it exits. */
#include <stdio.h>
#include <time.h>

int main(void) {
    struct timespec t;
    clock_gettime(CLOCK_BOOTTIME, &t);
    printf("bench: first line at boottime %ld.%06ld s\n", (long)t.tv_sec, t.tv_nsec / 1000);
    fflush(stdout);
    return 0;
}
