from devstack.access.recorder import main

main()
