#include <stdio.h>

int main(void)
{
	puts("hello from portsd");
	return 0;
}
