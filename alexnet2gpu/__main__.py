from alexnet2gpu.cli import main

main()
