/* The builder's test workload: a static binary that says hello and exits. */
#include <stdio.h>

int main(void) {
    puts("hello from the workload");
    return 0;
}
